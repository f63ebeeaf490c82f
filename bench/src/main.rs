//! Podium's benchmark harness: drives a running Podium over HTTP and SSE
//! like real clients, measures the ceilings of this machine in the same run,
//! and writes BENCHMARKS.md with charts.
//!
//!     cargo run --release -p podium-bench -- all            # the full run
//!     cargo run -p podium-bench -- all --smoke --out /tmp/b.md   # seconds, tiny sizes (CI)
//!
//! `scripts/bench` starts what it needs first. Needs Postgres, NATS, Redis,
//! pgbench and redis-benchmark.

mod ceilings;
mod delivery;
mod load;
mod report;
mod scenarios;
mod server;
mod streams;
#[path = "../../examples/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use podium::auth::Role;

use load::{closed_loop, ms, Paths};
use report::Report;
use scenarios::Api;
use server::{Options, Server};
use support::ScratchDb;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Every scenario and ceiling; writes the report.
    All(AllArgs),
    /// (internal) A Podium server for the harness to drive.
    Serve,
    /// Only the live scenarios of one server (ingest, freshness, queries,
    /// SSE), printed to stderr.
    Live(AllArgs),
    /// Only "three instances vs one", printed to stderr (for looking into it).
    Instances(AllArgs),
    /// Only replay and rank at scale (seed, replay, the rank index, Redis),
    /// printed to stderr.
    Scale(AllArgs),
    /// Only the SSE streams (memory, idle CPU, one change to all), printed
    /// to stderr.
    Streams(AllArgs),
    /// Only email and webhook delivery, printed to stderr.
    Delivery(AllArgs),
    /// Only the backlog a live instance works off, printed to stderr (its
    /// ratios are against placeholders: `all` measures their ceilings).
    Backlog(BacklogArgs),
    /// Only a collection's board against its test's (freshness), printed
    /// to stderr.
    Collections(AllArgs),
}

#[derive(clap::Args)]
struct AllArgs {
    /// Seconds and sizes small enough for CI.
    #[arg(long)]
    smoke: bool,
    /// Where the report goes.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Where the charts go (the report links them relative to itself).
    #[arg(long, default_value = "docs/bench")]
    charts: PathBuf,
}

#[derive(clap::Args)]
struct BacklogArgs {
    #[command(flatten)]
    all: AllArgs,
    /// Only these of the jobs a backlog makes (repeat it for several), the
    /// others' leases held by someone else for as long as they run: what a
    /// job costs by itself, or beside another.
    #[arg(long, value_enum)]
    only: Vec<BacklogJob>,
    /// Attempts in the backlog (two events each; 100,000 by default, 1,000
    /// with `--smoke`): 1000000 makes the 2,000,000-event backlog of issue 14.
    #[arg(long)]
    attempts: Option<u64>,
}

/// The jobs a live instance works a backlog off with, each on leases of its
/// own.
#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum BacklogJob {
    /// The relay, publishing the log to NATS.
    Relay,
    /// The notification policy, reading the log itself and notifying.
    Policy,
    /// The read models, caught up by one rebuild.
    ReadModels,
}

impl BacklogJob {
    /// Whether `role` (a name of [`BACKLOG_PROJECTIONS`], or `catalog`) is
    /// one of this job's.
    fn runs(self, role: &str) -> bool {
        match self {
            Self::Relay => role == "relay",
            Self::Policy => role == "notification-policy",
            Self::ReadModels => !matches!(role, "relay" | "notification-policy"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Relay => "the relay",
            Self::Policy => "the notification policy",
            Self::ReadModels => "the read models' rebuild",
        }
    }
}

/// How big and how long.
struct Sizes {
    secs: Duration,
    /// Attempts (so users and leaderboard entries) for rank and replay.
    attempts: u64,
    streams: usize,
    concurrency: usize,
    users: usize,
    tests: usize,
    redis_requests: u64,
    /// Emails (and webhooks) in a delivery throughput run.
    deliveries: usize,
    /// Recipients of the announcement a personal best is sent behind.
    crowd: usize,
    /// Attempts in the log a backlog run works off (two events each): a
    /// tenth of the replay's, so that the full run stays near ten minutes.
    backlog_attempts: u64,
}

impl Sizes {
    fn new(smoke: bool) -> Self {
        if smoke {
            Self {
                secs: Duration::from_secs(1),
                attempts: 2_000,
                streams: 20,
                concurrency: 4,
                users: 40,
                tests: 2,
                redis_requests: 2_000,
                deliveries: 100,
                crowd: 200,
                backlog_attempts: 1_000,
            }
        } else {
            Self {
                secs: Duration::from_secs(10),
                attempts: 1_000_000,
                streams: 18_000,
                concurrency: 32,
                users: 5_000,
                tests: 4,
                redis_requests: 300_000,
                deliveries: 5_000,
                crowd: 10_000,
                backlog_attempts: 100_000,
            }
        }
    }
}

const CONNECTIONS: usize = 64;

/// Where a freshness run's events waited, for its row: the mean from the
/// start of their transaction to the relay's publication and to the
/// leaderboard's commit.
fn waited(fresh: &scenarios::Freshness) -> String {
    fresh.waited_ms.map_or(String::new(), |(relay, board)| {
        format!(" (events' mean wait from their transaction: to the relay {relay:.1} ms, to the leaderboard's commit {board:.1} ms)")
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve) {
        // The replay says how long each of its phases took.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "podium::projector::replay=info",
            ))
            .with_writer(std::io::stderr)
            .try_init();
    }
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Serve => runtime.block_on(server::serve()),
        Command::All(args) => runtime.block_on(all(args)),
        Command::Instances(args) => runtime.block_on(async {
            let mut report = Report::default();
            instances_scenario(&Sizes::new(args.smoke), &mut report).await?;
            eprintln!("{}", report.markdown("", "podium-bench instances"));
            anyhow::Ok(())
        }),
        Command::Live(args) => runtime.block_on(async {
            let mut report = Report::default();
            live_only(&Sizes::new(args.smoke), &mut report).await?;
            eprintln!("{}", report.markdown("", "podium-bench live"));
            anyhow::Ok(())
        }),
        Command::Streams(args) => runtime.block_on(streams_only(&Sizes::new(args.smoke))),
        Command::Delivery(args) => runtime.block_on(async {
            let mut report = Report::default();
            delivery_scenario(&Sizes::new(args.smoke), &mut report).await?;
            eprintln!("{}", report.markdown("", "podium-bench delivery"));
            anyhow::Ok(())
        }),
        Command::Collections(args) => runtime.block_on(async {
            let mut report = Report::default();
            collection_scenario(&Sizes::new(args.smoke), &mut report).await?;
            eprintln!("{}", report.markdown("", "podium-bench collections"));
            anyhow::Ok(())
        }),
        Command::Backlog(args) => runtime.block_on(async {
            let mut report = Report::default();
            let mut sizes = Sizes::new(args.all.smoke);
            if let Some(attempts) = args.attempts {
                anyhow::ensure!(attempts > 0, "--attempts: at least one attempt");
                sizes.backlog_attempts = attempts;
            }
            if args.only.is_empty() {
                backlog_scenario(&sizes, None, &mut report).await?;
                if !args.all.smoke {
                    backlog_jobs_apart(&sizes, None, &mut report).await?;
                }
            } else {
                backlog_jobs_alone(&sizes, &args.only, &mut report).await?;
            }
            eprintln!("{}", report.markdown("", "podium-bench backlog"));
            anyhow::Ok(())
        }),
        Command::Scale(args) => runtime.block_on(async {
            let mut report = Report::default();
            let scale = ScratchDb::create(4).await?;
            let result = scale_scenarios(&scale, &Sizes::new(args.smoke), &mut report).await;
            scale.drop().await?;
            result?;
            eprintln!("{}", report.markdown("", "podium-bench scale"));
            anyhow::Ok(())
        }),
    }
}

fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

async fn all(args: AllArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let sizes = Sizes::new(args.smoke);
    let mut report = Report {
        machine: machine().await,
        ..Report::default()
    };
    let ingest_rate = live_only(&sizes, &mut report).await?;
    embedded_scenarios(&sizes, &mut report).await?;
    let scale = ScratchDb::create(4).await?;
    let result = scale_scenarios(&scale, &sizes, &mut report).await;
    scale.drop().await?;
    let replay_rate = result?;
    backlog_scenario(&sizes, Some((replay_rate, ingest_rate)), &mut report).await?;
    // At smoke sizes a job alone can wait on the relay held elsewhere
    // (the policy's catch-up from the log starts from the relay's head).
    if !args.smoke {
        backlog_jobs_apart(&sizes, Some(replay_rate), &mut report).await?;
    }
    collection_scenario(&sizes, &mut report).await?;
    instances_scenario(&sizes, &mut report).await?;
    delivery_scenario(&sizes, &mut report).await?;
    let command = if args.smoke {
        "podium-bench all --smoke"
    } else {
        "scripts/bench"
    };
    report.machine.push((
        "run time".into(),
        format!("{:.0} s", started.elapsed().as_secs_f64()),
    ));
    let charts_rel = relative(&args.charts, &args.out);
    report.charts(&args.charts)?;
    std::fs::write(&args.out, report.markdown(&charts_rel, command))?;
    eprintln!(
        "wrote {} and charts in {}",
        args.out.display(),
        args.charts.display()
    );
    Ok(())
}

/// [`live_scenarios`] on a database and NATS prefix of their own, removed
/// after; the ingest maximum in commands/s.
async fn live_only(sizes: &Sizes, report: &mut Report) -> anyhow::Result<f64> {
    let prefix = format!("bench{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let live = ScratchDb::create(2).await?;
    let result = live_scenarios(&live, &prefix, sizes, report).await;
    cleanup_nats(&prefix).await;
    live.drop().await?;
    result
}

/// Email and webhook delivery on a server and database of their own.
async fn delivery_scenario(sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    let prefix = format!("bench{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let db = ScratchDb::create(2).await?;
    let delivery_sizes = delivery::Sizes {
        backlog: sizes.deliveries,
        crowd: sizes.crowd,
        secs: sizes.secs,
    };
    let result = delivery::scenario(&db, &nats_url(), &prefix, &delivery_sizes, report).await;
    cleanup_nats(&prefix).await;
    db.drop().await?;
    result
}

/// `charts` as seen from the folder of `out`.
fn relative(charts: &std::path::Path, out: &std::path::Path) -> String {
    let base = out.parent().filter(|p| !p.as_os_str().is_empty());
    match base.and_then(|b| charts.strip_prefix(b).ok()) {
        Some(rel) => rel.display().to_string(),
        None if base.is_none() => charts.display().to_string(),
        None => std::path::absolute(charts)
            .map_or(charts.display().to_string(), |p| p.display().to_string()),
    }
}

/// Streams on one instance: memory per stream, the CPU of idle streams'
/// heartbeats, and one change to all of them.
async fn streams_scenario(
    api: &Api,
    server: &Server,
    test: uuid::Uuid,
    sizes: &Sizes,
    report: &mut Report,
) -> anyhow::Result<()> {
    eprintln!("SSE fan-out to {} streams…", sizes.streams);
    // Two heartbeats (every 15 s by default) of every stream.
    let idle = if sizes.streams > 100 { 30 } else { 2 };
    let fan = scenarios::fan_out(
        api,
        server.addr,
        test,
        sizes.streams,
        Duration::from_secs(idle),
        server,
    )
    .await?;
    let (p50, p99, last) = (
        ms(&fan.delivery, 0.5),
        ms(&fan.delivery, 0.99),
        ms(&fan.delivery, 1.0),
    );
    let writing_ms = fan.writing_ms;
    report.row(
        &format!("SSE: {} open streams on one instance", fan.streams),
        format!("{:.2} KiB RSS per stream", fan.rss_per_stream_kib),
        "—".into(),
        None,
        "≤ 4 KiB per stream",
        Some(fan.rss_per_stream_kib <= 4.0),
    );
    report.row(
        &format!("SSE: one change to {} open streams", fan.streams),
        format!(
            "p50 {p50:.0} / p99 {p99:.0} ms, all within {last:.0} ms \
             (each writer wrote it to its streams in {writing_ms:.0} ms)"
        ),
        "—".into(),
        None,
        "p99 ≤ 200 ms",
        Some(p99 <= 200.0),
    );
    report.row(
        &format!("SSE: {} idle streams with heartbeats", fan.streams),
        format!(
            "the server at {:.2}% of a core with them, everything included \
             ({:.2}% over as long before they opened; {:.0} s each)",
            fan.idle_cpu_percent,
            fan.baseline_cpu_percent,
            fan.idle.as_secs_f64(),
        ),
        "—".into(),
        None,
        "< 2% of a core",
        Some(fan.idle_cpu_percent < 2.0),
    );
    Ok(())
}

/// Only the streams scenario, on a server of its own.
async fn streams_only(sizes: &Sizes) -> anyhow::Result<()> {
    let prefix = format!("bench{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let db = ScratchDb::create(2).await?;
    let nats = nats_url();
    let result = async {
        let server = Server::start(Options::full(&db.url, &nats, &prefix)).await?;
        let api = Api::new(&server.address)?;
        let test = api.publish_test().await?;
        let mut report = Report::default();
        streams_scenario(&api, &server, test, sizes, &mut report).await?;
        eprintln!("{}", report.markdown("", "podium-bench streams"));
        server.stop().await;
        anyhow::Ok(())
    }
    .await;
    cleanup_nats(&prefix).await;
    db.drop().await?;
    result
}

/// Ingest, freshness, queries and SSE fan-out on a server with NATS and
/// workers; the HTTP ceiling and pgbench beside them.
async fn live_scenarios(
    db: &ScratchDb,
    prefix: &str,
    sizes: &Sizes,
    report: &mut Report,
) -> anyhow::Result<f64> {
    let nats = nats_url();
    let server = Server::start(Options::full(&db.url, &nats, prefix)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_mib = server.rss_kib() as f64 / 1024.0;
    let api = Api::new(&server.address)?;
    let viewer = Arc::new(vec![api.token("viewer", Role::User)]);

    eprintln!("HTTP ceiling…");
    let ceiling = closed_loop(
        server.addr,
        viewer.clone(),
        CONNECTIONS,
        sizes.secs,
        Arc::new(|_| "/healthz".into()),
    )
    .await?;

    eprintln!("pgbench ceiling…");
    let pg = ScratchDb::create(1).await?;
    let pgbench = ceilings::pgbench_command(&pg.url, 16, sizes.secs);
    pg.drop().await?;
    let pgbench = pgbench?;

    let mut tests = Vec::new();
    for _ in 0..sizes.tests {
        tests.push(api.publish_test().await?);
    }
    eprintln!("ingest…");
    let ingest =
        scenarios::ingest(&api, &tests, sizes.users, sizes.concurrency, sizes.secs).await?;
    // Freshness is measured on a caught-up system, not behind ingest's backlog.
    scenarios::settle_log(&db.pool).await?;
    report.row(
        "ingest: commands (start, answer, submit)",
        format!(
            "{:.0} commands/s ({:.0} submissions/s), p99 {:.1} ms",
            ingest.commands_per_second,
            ingest.submissions_per_second,
            ms(&ingest.latency, 0.99)
        ),
        format!("pgbench command shape: {pgbench:.0} tx/s"),
        Some(ingest.commands_per_second / pgbench),
        "≥ 50% of pgbench",
        Some(ingest.commands_per_second >= 0.5 * pgbench),
    );
    report
        .latencies
        .push(("ingest commands".into(), ingest.latency.clone()));
    report.timeline = ingest.timeline.clone();

    for (share, label) in [
        (0.5, "half the ingest maximum"),
        (0.9, "near saturation (90%)"),
    ] {
        let rate = (ingest.submissions_per_second * share).max(1.0);
        eprintln!("freshness at {rate:.0}/s…");
        let fresh = scenarios::freshness(&api, server.addr, tests[0], rate, sizes.secs).await?;
        let (q99, s99) = (ms(&fresh.to_query, 0.99), ms(&fresh.to_sse, 0.99));
        let half = share < 0.6;
        report.row(
            &format!("freshness at {rate:.0} submissions/s ({label})"),
            format!(
                "to query p50 {:.1} / p99 {q99:.1} ms; to SSE p50 {:.1} / p99 {s99:.1} ms{}",
                ms(&fresh.to_query, 0.5),
                ms(&fresh.to_sse, 0.5),
                waited(&fresh),
            ),
            "—".into(),
            None,
            if half {
                "p99 ≤ 50 ms query, ≤ 75 ms SSE"
            } else {
                "p99 ≤ 250 ms"
            },
            Some(if half {
                q99 <= 50.0 && s99 <= 75.0
            } else {
                q99 <= 250.0 && s99 <= 250.0
            }),
        );
        report
            .freshness
            .push((format!("to query at {rate:.0}/s"), fresh.to_query));
        report
            .freshness
            .push((format!("to SSE at {rate:.0}/s"), fresh.to_sse));
    }

    eprintln!("queries…");
    let test = tests[0];
    let top = api
        .get_json(
            &format!("/v1/tests/{test}/leaderboard?limit=200"),
            &viewer[0],
        )
        .await?;
    let users: Vec<String> = top["entries"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter_map(|e| e["user_id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    anyhow::ensure!(!users.is_empty(), "the leaderboard is empty after ingest");
    let mut cursors = Vec::new();
    let mut page = api
        .get_json(
            &format!("/v1/tests/{test}/leaderboard?limit=50"),
            &viewer[0],
        )
        .await?;
    while let Some(cursor) = page["next_cursor"]
        .as_str()
        .map(String::from)
        .filter(|_| cursors.len() < 10)
    {
        cursors.push(cursor.clone());
        page = api
            .get_json(
                &format!("/v1/tests/{test}/leaderboard?limit=50&cursor={cursor}"),
                &viewer[0],
            )
            .await?;
    }
    let user_tokens: Arc<Vec<String>> =
        Arc::new(users.iter().map(|u| api.token(u, Role::User)).collect());
    let around_users = Arc::new(users.clone());
    let queries: Vec<(&str, Arc<Vec<String>>, Paths)> = vec![
        (
            "cached top page (50 entries)",
            viewer.clone(),
            Arc::new(move |_| format!("/v1/tests/{test}/leaderboard?limit=50")),
        ),
        ("keyset page (cursor, 50 entries)", viewer.clone(), {
            let cursors = Arc::new(if cursors.is_empty() {
                vec![String::new()]
            } else {
                cursors
            });
            Arc::new(
                move |i| match cursors[i as usize % cursors.len()].as_str() {
                    "" => format!("/v1/tests/{test}/leaderboard?limit=50"),
                    cursor => format!("/v1/tests/{test}/leaderboard?limit=50&cursor={cursor}"),
                },
            )
        }),
        (
            "around-user (radius 5)",
            viewer.clone(),
            Arc::new(move |i| {
                format!(
                    "/v1/tests/{test}/leaderboard/users/{}",
                    around_users[i as usize % around_users.len()]
                )
            }),
        ),
        (
            "notification feed (20 items)",
            user_tokens,
            Arc::new(|_| "/v1/me/notifications?limit=20".into()),
        ),
        (
            "this week's top page (50 entries)",
            viewer.clone(),
            Arc::new(move |_| format!("/v1/tests/{test}/leaderboard?limit=50&window=week")),
        ),
    ];
    let mut all_time = None;
    for (name, tokens, paths) in queries {
        let measured = closed_loop(server.addr, tokens, CONNECTIONS, sizes.secs, paths).await?;
        let (rps, p99) = (measured.per_second, ms(&measured.latency, 0.99));
        let cached_top = name.starts_with("cached top");
        if cached_top {
            all_time = Some(rps);
        }
        if let Some(all_time) = all_time.filter(|_| name.contains("week")) {
            report.row(
                &format!("queries: {name}, {CONNECTIONS} connections"),
                format!(
                    "{rps:.0} req/s, p50 {:.2} / p99 {p99:.2} ms",
                    ms(&measured.latency, 0.5)
                ),
                format!("the all-time top page: {all_time:.0} req/s"),
                Some(rps / all_time),
                "as fast as the all-time page (≥ 90%)",
                Some(rps >= 0.9 * all_time),
            );
            report.latencies.push((name.to_string(), measured.latency));
            continue;
        }
        report.row(
            &format!("queries: {name}, {CONNECTIONS} connections"),
            format!(
                "{rps:.0} req/s, p50 {:.2} / p99 {p99:.2} ms",
                ms(&measured.latency, 0.5)
            ),
            format!("`/healthz`: {:.0} req/s", ceiling.per_second),
            Some(rps / ceiling.per_second),
            if cached_top {
                "≥ 35% of `/healthz`, p99 ≤ 10 ms"
            } else {
                "—"
            },
            cached_top.then_some(rps >= 0.35 * ceiling.per_second && p99 <= 10.0),
        );
        report.latencies.push((name.to_string(), measured.latency));
    }
    report
        .latencies
        .push(("GET /healthz (ceiling)".into(), ceiling.latency));
    overhead(db, prefix, test, sizes, report).await?;

    streams_scenario(&api, &server, test, sizes, report).await?;
    report.row(
        "idle RSS",
        format!("{idle_mib:.1} MiB"),
        "—".into(),
        None,
        "≤ 50 MB",
        Some(idle_mib <= 50.0),
    );
    server.stop().await;
    // Each command writes one event.
    Ok(ingest.commands_per_second)
}

/// The embedded mode (no Postgres, no NATS) under the same ingest,
/// freshness and cached-page load as production.
async fn embedded_scenarios(sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    let server = Server::start(Options::full("", "", "embedded")).await?;
    let api = Api::new(&server.address)?;
    let viewer = Arc::new(vec![api.token("viewer", Role::User)]);
    let mut tests = Vec::new();
    for _ in 0..sizes.tests {
        tests.push(api.publish_test().await?);
    }
    eprintln!("embedded: ingest…");
    let ingest =
        scenarios::ingest(&api, &tests, sizes.users, sizes.concurrency, sizes.secs).await?;
    scenarios::settle(&api).await?;
    report.row(
        "embedded: ingest commands",
        format!(
            "{:.0} commands/s ({:.0} submissions/s), p99 {:.1} ms",
            ingest.commands_per_second,
            ingest.submissions_per_second,
            ms(&ingest.latency, 0.99)
        ),
        "—".into(),
        None,
        "—",
        None,
    );
    let rate = (ingest.submissions_per_second * 0.5).max(1.0);
    eprintln!("embedded: freshness at {rate:.0}/s…");
    let fresh = scenarios::freshness(&api, server.addr, tests[0], rate, sizes.secs).await?;
    report.row(
        &format!("embedded: freshness at {rate:.0} submissions/s (half its maximum)"),
        format!(
            "to query p50 {:.1} / p99 {:.1} ms; to SSE p50 {:.1} / p99 {:.1} ms",
            ms(&fresh.to_query, 0.5),
            ms(&fresh.to_query, 0.99),
            ms(&fresh.to_sse, 0.5),
            ms(&fresh.to_sse, 0.99)
        ),
        "—".into(),
        None,
        "—",
        None,
    );
    let test = tests[0];
    let measured = closed_loop(
        server.addr,
        viewer,
        CONNECTIONS,
        sizes.secs,
        Arc::new(move |_| format!("/v1/tests/{test}/leaderboard?limit=50")),
    )
    .await?;
    report.row(
        &format!("embedded: cached top page (50 entries), {CONNECTIONS} connections"),
        format!(
            "{:.0} req/s, p50 {:.2} / p99 {:.2} ms",
            measured.per_second,
            ms(&measured.latency, 0.5),
            ms(&measured.latency, 0.99)
        ),
        "—".into(),
        None,
        "—",
        None,
    );
    let metrics = api.metrics().await?;
    let events = metrics
        .lines()
        .find(|l| l.starts_with("podium_projection_checkpoint_seq{projection=\"embedded\"}"))
        .and_then(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .unwrap_or(0.0);
    let rss = server.rss_kib() as f64;
    report.row(
        &format!("embedded: RSS with {events:.0} events in the log"),
        format!(
            "{:.1} MiB ({:.2} KiB per event, read models included)",
            rss / 1024.0,
            rss / events.max(1.0)
        ),
        "—".into(),
        None,
        "—",
        None,
    );
    server.stop().await;
    Ok(())
}

/// What the rate limiter and the request metrics cost on the cached top
/// page: the same page from API-only servers with each of them off and on.
async fn overhead(
    db: &ScratchDb,
    prefix: &str,
    test: uuid::Uuid,
    sizes: &Sizes,
    report: &mut Report,
) -> anyhow::Result<()> {
    const HUGE: &str = "user_commands=100000000/min,user_queries=100000000/min,ip=100000000/min";
    let nats = nats_url();
    let mut baseline = None;
    for (name, limits, metrics) in [
        ("limiter off, metrics off", "off", false),
        ("limiter on, metrics off", HUGE, false),
        ("limiter off, metrics on", "off", true),
        ("limiter on, metrics on", HUGE, true),
    ] {
        eprintln!("overhead: {name}…");
        let server = Server::start(Options {
            database_url: &db.url,
            nats_url: &nats,
            prefix,
            rate_limits: limits,
            metrics,
            workers: false,
            cache: true,
        })
        .await?;
        let api = Api::new(&server.address)?;
        let tokens = Arc::new(vec![api.token("viewer", Role::User)]);
        let path = format!("/v1/tests/{test}/leaderboard?limit=50");
        // Warm the cache.
        api.client
            .get(format!("{}{path}", api.base))
            .bearer_auth(&tokens[0])
            .send()
            .await?;
        let measured = closed_loop(
            server.addr,
            tokens,
            CONNECTIONS,
            sizes.secs,
            Arc::new(move |_| path.clone()),
        )
        .await?;
        server.stop().await;
        let rps = measured.per_second;
        let base = *baseline.get_or_insert(rps);
        report.row(
            &format!("overhead: cached top page, {name}"),
            format!("{rps:.0} req/s, p99 {:.2} ms", ms(&measured.latency, 0.99)),
            format!("both off: {base:.0} req/s"),
            Some(rps / base),
            "—",
            None,
        );
    }
    Ok(())
}

/// Replay of a large log, and rank lookups on the leaderboard it builds,
/// against their ceilings: reading the log, and Redis.
/// Rank and replay at scale; returns the replay rate (events/s).
async fn scale_scenarios(
    db: &ScratchDb,
    sizes: &Sizes,
    report: &mut Report,
) -> anyhow::Result<f64> {
    eprintln!("seeding {} attempts…", sizes.attempts);
    let mut quiet = |_, _| {};
    let (test, events) = podium::cli::bulk_seed::bulk(&db.pool, sizes.attempts, &mut quiet).await?;
    eprintln!("reading the log…");
    let (read, read_rate) = ceilings::read_log(&db.pool).await?;
    anyhow::ensure!(read == events, "read {read} of {events} events");
    eprintln!("replaying {events} events…");
    let replay_started = Instant::now();
    let mut progress = podium::projector::replay::stderr_progress();
    podium::projector::replay::replay(
        &db.pool,
        &podium::projector::replay::Scope::All.read_models(),
        &mut progress,
    )
    .await?;
    let replay_rate = events as f64 / replay_started.elapsed().as_secs_f64();
    report.row(
        &format!("replay: all read models from {events} events"),
        format!("{replay_rate:.0} events/s"),
        format!("reading and decoding the log: {read_rate:.0} events/s"),
        Some(replay_rate / read_rate),
        "≥ 50% of the read",
        Some(replay_rate >= 0.5 * read_rate),
    );

    // NATS tells the server of changes, so it holds a rank index (nothing
    // changes here: no workers); no query cache, so every read is ranked.
    let prefix = format!("benchsc{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let server = Server::start(Options {
        database_url: &db.url,
        nats_url: &nats_url(),
        prefix: &prefix,
        rate_limits: "off",
        metrics: true,
        workers: false,
        cache: false,
    })
    .await;
    let result = async {
        let server = server?;
        let measured = rank_at_scale(&server, test, sizes, report).await;
        server.stop().await;
        measured
    }
    .await;
    cleanup_nats(&prefix).await;
    let measured = result?;
    let attempts = sizes.attempts;
    eprintln!("Redis ceiling…");
    let redis = ceilings::redis(attempts, CONNECTIONS as u32, sizes.redis_requests)?;
    let (rps, p99) = (measured.per_second, ms(&measured.latency, 0.99));
    report.row(
        &format!("rank at scale: around-user on {attempts} entries, {CONNECTIONS} connections"),
        format!(
            "{rps:.0} req/s, p50 {:.2} / p99 {p99:.2} ms",
            ms(&measured.latency, 0.5)
        ),
        format!(
            "Redis ZREVRANK {:.0}/s (p99 {:.2} ms) + ZREVRANGE {:.0}/s = {:.0} pairs/s",
            redis.rank_per_second,
            redis.rank_p99_ms,
            redis.range_per_second,
            redis.pairs_per_second()
        ),
        Some(rps / redis.pairs_per_second()),
        "≥ 50% of Redis pairs, p99 ≤ 5 ms",
        Some(rps >= 0.5 * redis.pairs_per_second() && p99 <= 5.0),
    );
    report
        .latencies
        .push((format!("around-user, {attempts} entries"), measured.latency));
    Ok(replay_rate)
}

/// The value of `/metrics` line `name` (with its labels, if any), 0 if absent.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit_once(' ')?.1.parse().ok())
        .unwrap_or(0.0)
}

/// The rank index on the scale board: its warm-up (time and bytes per
/// entry), then around-user and a deep offset page from it. Returns the
/// around-user measure (for the row beside Redis).
async fn rank_at_scale(
    server: &Server,
    test: uuid::Uuid,
    sizes: &Sizes,
    report: &mut Report,
) -> anyhow::Result<load::Measured> {
    let api = Api::new(&server.address)?;
    let token = api.token("viewer", Role::User);
    let viewer = Arc::new(vec![token.clone()]);
    let attempts = sizes.attempts;
    eprintln!("warming the rank index…");
    let started = Instant::now();
    // The first read starts the warm-up (and is answered from SQL).
    api.get_json(&format!("/v1/tests/{test}/leaderboard?limit=1"), &token)
        .await?;
    let text = loop {
        let text = api.metrics().await?;
        if metric(&text, "podium_rank_index_boards") >= 1.0 {
            break text;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the board did not warm"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let warm_up = started.elapsed().as_secs_f64();
    let entries = metric(&text, "podium_rank_index_entries");
    let index = metric(&text, "podium_rank_index_bytes{part=\"index\"}") / entries;
    let ids = metric(&text, "podium_rank_index_bytes{part=\"user_ids\"}") / entries;
    report.row(
        &format!("rank index: warm-up of a board of {entries:.0} entries"),
        format!("{warm_up:.2} s; {index:.1} B per entry, and {ids:.1} B of user id"),
        "—".into(),
        None,
        "≤ 5 s; ≤ 64 B per entry beyond the user id",
        Some(warm_up <= 5.0 && index <= 64.0),
    );
    eprintln!("rank at scale…");
    let around = closed_loop(
        server.addr,
        viewer.clone(),
        CONNECTIONS,
        sizes.secs,
        Arc::new(move |i| {
            let user = 1 + i.wrapping_mul(2_654_435_761) % attempts;
            format!("/v1/tests/{test}/leaderboard/users/user-{user}")
        }),
    )
    .await?;
    // Ranks 999,950 to 999,999 on a million entries, beside the same page
    // at the top (both from the index, neither cached): a page's depth
    // should cost nothing.
    let page = |offset: u64| {
        closed_loop(
            server.addr,
            viewer.clone(),
            CONNECTIONS,
            sizes.secs,
            Arc::new(move |_| format!("/v1/tests/{test}/leaderboard?offset={offset}&limit=50")),
        )
    };
    let top = page(0).await?;
    let offset = attempts.saturating_sub(51);
    let deep = page(offset).await?;
    let p99 = ms(&deep.latency, 0.99);
    report.row(
        &format!(
            "rank at scale: offset page at rank {} (50 entries), {CONNECTIONS} connections",
            offset + 1
        ),
        format!(
            "{:.0} req/s, p50 {:.2} / p99 {p99:.2} ms",
            deep.per_second,
            ms(&deep.latency, 0.5)
        ),
        format!(
            "the top page, uncached: {:.0} req/s, p99 {:.2} ms",
            top.per_second,
            ms(&top.latency, 0.99)
        ),
        Some(deep.per_second / top.per_second),
        "p99 ≤ 5 ms",
        Some(p99 <= 5.0),
    );
    report.latencies.push((
        format!("offset page at rank {}, {attempts} entries", offset + 1),
        deep.latency,
    ));
    Ok(around)
}

/// A server with NATS, running the relay and the projections.
async fn server_with_workers(database_url: &str, prefix: &str) -> anyhow::Result<Server> {
    Server::start(Options::full(database_url, &nats_url(), prefix)).await
}

/// The same burst of submissions on one instance and on three (spread over
/// all of them): how long the read models take to catch up after it.
async fn instances_scenario(sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    let burst = (sizes.users * 2).min(4_000);
    let mut catch_up = Vec::new();
    for count in [1, 3] {
        let db = ScratchDb::create(2).await?;
        let prefix = format!("benchin{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let result = async {
            let mut servers = Vec::new();
            for _ in 0..count {
                servers.push(server_with_workers(&db.url, &prefix).await?);
            }
            let apis: Vec<Api> = servers
                .iter()
                .map(|s| Api::new(&s.address))
                .collect::<Result<_, _>>()?;
            let test = apis[0].publish_test().await?;
            scenarios::settle_log(&db.pool).await?;
            eprintln!("a burst of {burst} submissions on {count} instance(s)…");
            let step = sizes.concurrency;
            let mut clients = Vec::new();
            for client in 0..step {
                let api = apis[client % apis.len()].clone();
                clients.push(tokio::spawn(async move {
                    for i in (client..burst).step_by(step) {
                        let token = api.token(&format!("burst-{i}"), Role::User);
                        api.take(test, &token, i as u64).await?;
                    }
                    anyhow::Ok(())
                }));
            }
            for client in clients {
                client.await??;
            }
            let burst_done = Instant::now();
            let behind: Vec<String> = apis[0]
                .metrics()
                .await?
                .lines()
                .filter(|l| {
                    l.starts_with("podium_projection_lag_events")
                        || l.starts_with("podium_relay_lag_events")
                })
                .map(String::from)
                .collect();
            eprintln!("at the end of the burst: {behind:?}");
            scenarios::settle_log(&db.pool).await?;
            let elapsed = burst_done.elapsed();
            for server in servers {
                server.stop().await;
            }
            anyhow::Ok(elapsed)
        }
        .await;
        cleanup_nats(&prefix).await;
        db.drop().await?;
        catch_up.push(result?);
    }
    let (one, three) = (catch_up[0].as_secs_f64(), catch_up[1].as_secs_f64());
    let ratio = three / one.max(0.001);
    report.row(
        &format!("three instances vs one: catch-up after a burst of {burst} submissions"),
        format!("three instances: {:.0} ms", three * 1000.0),
        format!("one instance: {:.0} ms", one * 1000.0),
        Some(ratio),
        "ratio ≤ 2",
        Some(ratio <= 2.0),
    );
    Ok(())
}

/// A live instance working off a backlog: the log seeded directly (as after
/// every instance was down for long), then one `podium serve` with NATS
/// started on it, its relay and four projections catching up from nothing.
/// Compared with the replay and ingest rates of the same run, when it
/// measured them (`ceilings`).
async fn backlog_scenario(
    sizes: &Sizes,
    ceilings: Option<(f64, f64)>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let db = ScratchDb::create(2).await?;
    let prefix = format!("benchbl{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let result = async {
        let attempts = sizes.backlog_attempts;
        let worked = work_off(&db, &prefix, attempts, &BACKLOG_PROJECTIONS, &[]).await?;
        let slowest = worked.slowest();
        let WorkedOff {
            test_id,
            events,
            server,
            done,
            cpu,
        } = worked;
        // Past boards are read on a settled database, not behind the vacuum
        // of what the backlog wrote.
        sqlx::query("VACUUM (ANALYZE) my_attempts, lb_entries, events")
            .execute(&db.pool)
            .await?;
        as_of_rows(&server, test_id, attempts, sizes, report).await?;
        server.stop().await;
        let rate = events as f64 / slowest.as_secs_f64();
        let each: Vec<String> = done
            .iter()
            .map(|(p, d)| format!("{p} {:.0}/s", events as f64 / d.as_secs_f64()))
            .collect();
        // Each row against its ceiling: (ceiling, its name, target, factor).
        let (replay_rate, ingest_rate) = ceilings.unzip();
        let rows = [
            (
                format!("projection throughput: a backlog of {events} events caught up"),
                format!("{rate:.0} events/s"),
                ingest_rate.map(|r| (r, format!("ingest maximum: {r:.0} events/s"))),
                "≥ 3 × the ingest maximum",
                3.0,
            ),
            (
                format!(
                    "backlog: one live instance works off {events} events (relay and four projections)"
                ),
                format!("{rate:.0} events/s ({}){cpu}", each.join(", ")),
                replay_rate.map(|r| (r, format!("replay: {r:.0} events/s"))),
                "≥ 50% of the replay rate",
                0.5,
            ),
        ];
        for (scenario, result, ceiling, target, factor) in rows {
            let ratio = ceiling.as_ref().map(|(r, _)| rate / r);
            report.row(
                &scenario,
                result,
                ceiling.map_or_else(|| "not measured in this run".into(), |(_, name)| name),
                ratio,
                target,
                ratio.map(|ratio| ratio >= factor),
            );
        }
        anyhow::Ok(())
    }
    .await;
    cleanup_nats(&prefix).await;
    db.drop().await?;
    result
}

/// A backlog being worked off: the test it was seeded on, its events, the
/// server, how long each role took to reach its end, and where the
/// machine's CPU went meanwhile.
struct WorkedOff {
    test_id: uuid::Uuid,
    events: u64,
    server: Server,
    done: Vec<(&'static str, Duration)>,
    cpu: String,
}

impl WorkedOff {
    /// How long the last role took.
    fn slowest(&self) -> Duration {
        self.done.iter().map(|(_, d)| *d).max().unwrap_or_default()
    }
}

/// Seeds the log of `db` with `attempts` attempts directly (as after every
/// instance was down for long), then starts one `podium serve` with NATS
/// on it, its relay and projections catching up from nothing, and waits
/// until each of `roles` (names of [`BACKLOG_PROJECTIONS`]) has reached the
/// end of the seeded log. The leases named in `held` are taken first by
/// someone that never lets go: the server leaves those jobs alone.
async fn work_off(
    db: &ScratchDb,
    prefix: &str,
    attempts: u64,
    roles: &[&'static str],
    held: &[String],
) -> anyhow::Result<WorkedOff> {
    eprintln!("backlog of {attempts} attempts…");
    let mut quiet = |_, _| {};
    let (test_id, events) = podium::cli::bulk_seed::bulk(&db.pool, attempts, &mut quiet).await?;
    sqlx::query(
        "INSERT INTO leases (name, owner, token, expires_at)
         SELECT name, 'podium-bench, holding it', 1, now() + interval '1 day'
           FROM UNNEST($1::text[]) AS held(name)",
    )
    .bind(held)
    .execute(&db.pool)
    .await?;
    let nats = server::nats_server_pid(&nats_url());
    let cpu_before = (
        server::machine_busy_secs(),
        nats.and_then(server::process_cpu_secs),
    );
    let started = Instant::now();
    // The backlog is caught up from the log at any size (the default
    // threshold at the full size; a smoke run's backlog is below it, and a
    // job alone, without the relay, would wait for NATS for ever).
    let from = (events / 2).clamp(1, podium::config::DEFAULT_CATCH_UP_REBUILD_FROM);
    let server = Server::start_with(
        Options::full(&db.url, &nats_url(), prefix),
        &[("PODIUM_CATCH_UP_REBUILD_FROM", from.to_string())],
    )
    .await?;
    let mut done: Vec<(&str, Duration)> = Vec::new();
    let mut cpu = String::new();
    while done.len() < roles.len() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(3600),
            "the backlog was not worked off within an hour"
        );
        let checkpoints: Vec<(String, i64)> = sqlx::query_as(
            "SELECT name, seq FROM projection_checkpoints
             UNION ALL SELECT 'relay', seq FROM relay_checkpoints",
        )
        .fetch_all(&db.pool)
        .await?;
        for (name, seq) in checkpoints {
            if let Some(role) = roles.iter().find(|p| **p == name) {
                if seq as u64 >= events && !done.iter().any(|(p, _)| p == role) {
                    done.push((role, started.elapsed()));
                }
            }
        }
        if done.len() == roles.len() {
            cpu = cpu_shares(started.elapsed(), cpu_before, nats, server.cpu_secs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(WorkedOff {
        test_id,
        events,
        server,
        done,
        cpu,
    })
}

/// Some jobs of [`backlog_scenario`]'s by themselves (`podium-bench
/// backlog --only`): the same backlog, the other jobs' leases held
/// elsewhere.
async fn backlog_jobs_alone(
    sizes: &Sizes,
    jobs: &[BacklogJob],
    report: &mut Report,
) -> anyhow::Result<()> {
    let alone = jobs_alone(sizes, jobs).await?;
    let names: Vec<&str> = jobs.iter().map(|job| job.name()).collect();
    report.row(
        &format!(
            "backlog: {} alone work off {} events",
            names.join(" and "),
            alone.events
        ),
        format!(
            "{:.0} events/s in {:.1} s{}",
            alone.rate(),
            alone.took.as_secs_f64(),
            alone.cpu
        ),
        "—".into(),
        None,
        "—",
        None,
    );
    Ok(())
}

/// Each job of [`backlog_scenario`]'s working off the same backlog with the
/// machine to itself, one after another: the backlog as instances that
/// each own one job would work it off, each on cores of its own (Podium
/// spreads the leases of its jobs over its instances). Against the replay
/// rate of the same run, when it measured it: the slowest job.
async fn backlog_jobs_apart(
    sizes: &Sizes,
    replay_rate: Option<f64>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut each = Vec::new();
    for job in [
        BacklogJob::Relay,
        BacklogJob::Policy,
        BacklogJob::ReadModels,
    ] {
        each.push((job, jobs_alone(sizes, &[job]).await?));
    }
    let (_, alone) = each
        .iter()
        .min_by(|a, b| a.1.rate().total_cmp(&b.1.rate()))
        .expect("three jobs");
    let rate = alone.rate();
    let rates: Vec<String> = each
        .iter()
        .map(|(job, alone)| format!("{} {:.0}/s", job.name(), alone.rate()))
        .collect();
    let ratio = replay_rate.map(|replay| rate / replay);
    report.row(
        &format!(
            "backlog: each job on an instance of its own works off {} events (one job at a time, the machine to itself)",
            alone.events
        ),
        format!("{rate:.0} events/s, the slowest of: {}", rates.join(", ")),
        replay_rate.map_or_else(
            || "not measured in this run".into(),
            |r| format!("replay: {r:.0} events/s"),
        ),
        ratio,
        "≥ 50% of the replay rate",
        ratio.map(|ratio| ratio >= 0.5),
    );
    Ok(())
}

/// What some jobs of a backlog did by themselves.
struct Alone {
    events: u64,
    took: Duration,
    cpu: String,
}

impl Alone {
    fn rate(&self) -> f64 {
        self.events as f64 / self.took.as_secs_f64()
    }
}

/// `jobs` working off a backlog of their own, the other jobs' leases held
/// elsewhere.
async fn jobs_alone(sizes: &Sizes, jobs: &[BacklogJob]) -> anyhow::Result<Alone> {
    let db = ScratchDb::create(2).await?;
    let prefix = format!("benchbl{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let result = async {
        let attempts = sizes.backlog_attempts;
        let roles: Vec<&str> = BACKLOG_PROJECTIONS
            .into_iter()
            .filter(|role| jobs.iter().any(|job| job.runs(role)))
            .collect();
        let held: Vec<String> = BACKLOG_PROJECTIONS
            .into_iter()
            .chain(["catalog"])
            .filter(|role| !jobs.iter().any(|job| job.runs(role)))
            .map(|role| match role {
                "relay" => podium::relay::lease_name(&prefix),
                projection => podium::projector::lease_name(projection),
            })
            .collect();
        let worked = work_off(&db, &prefix, attempts, &roles, &held).await?;
        let took = worked.slowest();
        worked.server.stop().await;
        anyhow::Ok(Alone {
            events: worked.events,
            took,
            cpu: worked.cpu,
        })
    }
    .await;
    cleanup_nats(&prefix).await;
    db.drop().await?;
    result
}

/// Where the machine's CPU went over `took`, from the machine's and NATS's
/// busy time at its start (`before`) and the server's CPU time since it
/// started: "; CPU: the machine 97% busy, of that Podium 35%, NATS 26%,
/// Postgres and the rest 39%", or nothing where `/proc` does not tell.
fn cpu_shares(
    took: Duration,
    before: (Option<f64>, Option<f64>),
    nats: Option<u32>,
    podium: f64,
) -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let (Some(machine_before), Some(machine)) = (before.0, server::machine_busy_secs()) else {
        return String::new();
    };
    let busy = (machine - machine_before).max(0.001);
    let nats = match (before.1, nats.and_then(server::process_cpu_secs)) {
        (Some(from), Some(to)) => to - from,
        _ => return String::new(),
    };
    let share = |secs: f64| 100.0 * secs / busy;
    format!(
        "; CPU: the machine {:.0}% busy, of that Podium {:.0}%, NATS {:.0}%, Postgres and the rest {:.0}%",
        100.0 * busy / (took.as_secs_f64() * cores),
        share(podium),
        share(nats),
        share(busy - podium - nats),
    )
}

/// What works off a backlog: the relay first (when it is done, what is left
/// is the projections').
const BACKLOG_PROJECTIONS: [&str; 5] = [
    "relay",
    "leaderboard",
    "feed",
    "attempts",
    "notification-policy",
];

/// Tests in the collection of [`collection_scenario`].
const COLLECTION_TESTS: u64 = 10;

/// A collection of 10 tests with 100,000 learners (10,000 on each, seeded
/// in bulk and worked off by the live instance): the freshness of its board
/// against the freshness of one of its tests' boards, at the same rate of
/// submissions to that test.
async fn collection_scenario(sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    let db = ScratchDb::create(2).await?;
    let prefix = format!("benchco{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let result = async {
        let learners = (sizes.attempts / 10).max(1_000);
        let each = learners / COLLECTION_TESTS;
        eprintln!("a collection of {COLLECTION_TESTS} tests, {learners} learners…");
        let mut tests = Vec::new();
        let mut events = 0;
        let mut quiet = |_, _| {};
        for k in 0..COLLECTION_TESTS {
            let (test, written) =
                podium::cli::bulk_seed::bulk_from(&db.pool, k * each + 1, each, &mut quiet)
                    .await?;
            tests.push(test);
            events += written;
        }
        let server = server_with_workers(&db.url, &prefix).await?;
        let api = Api::new(&server.address)?;
        let viewer = api.token("viewer", Role::User);
        // Measured on a caught-up system: every projection past the seed.
        let caught_up = Instant::now();
        loop {
            let done: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM (SELECT name, seq FROM projection_checkpoints
                                       UNION ALL SELECT 'relay', seq FROM relay_checkpoints) c
                  WHERE c.name = ANY($1) AND c.seq >= $2",
            )
            .bind(BACKLOG_PROJECTIONS)
            .bind(events as i64)
            .fetch_one(&db.pool)
            .await?;
            if done == BACKLOG_PROJECTIONS.len() as i64 {
                break;
            }
            anyhow::ensure!(
                caught_up.elapsed() < Duration::from_secs(1800),
                "the seeded submissions were not worked off within 30 minutes"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // And past what the seed set off (the policy's notifications).
        scenarios::settle_log(&db.pool).await?;
        let created: serde_json::Value = api
            .client
            .post(format!("{}/v1/collections", api.base))
            .bearer_auth(api.token("bench-admin", Role::Admin))
            .json(&serde_json::json!({"title": "Bench term", "test_ids": tests}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let collection = created["id"].as_str().unwrap_or_default().to_string();
        let board = format!("/v1/collections/{collection}/leaderboard");
        let composed = Instant::now();
        loop {
            let page = api.get_json(&format!("{board}?limit=1"), &viewer).await?;
            if page["total"].as_u64() == Some(each * COLLECTION_TESTS) {
                break;
            }
            anyhow::ensure!(
                composed.elapsed() < Duration::from_secs(600),
                "the collection's board was not composed within 10 minutes"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let composed = composed.elapsed();
        // Freshness on a settled database, not behind the vacuum of what the
        // seed and the composition wrote.
        scenarios::settle_log(&db.pool).await?;
        sqlx::query("VACUUM (ANALYZE) lb_entries, lb_score_counts, events, my_attempts")
            .execute(&db.pool)
            .await?;
        let rate = 100.0;
        let test = tests[0];
        eprintln!("freshness of a test's board at {rate:.0}/s…");
        let test_board = format!("/v1/tests/{test}/leaderboard");
        let alone =
            scenarios::freshness_on(&api, server.addr, (test, &test_board), rate, sizes.secs)
                .await?;
        eprintln!("freshness of the collection's board at {rate:.0}/s…");
        let summed =
            scenarios::freshness_on(&api, server.addr, (test, &board), rate, sizes.secs).await?;
        server.stop().await;
        let (q, s) = (ms(&summed.to_query, 0.99), ms(&summed.to_sse, 0.99));
        let (tq, ts) = (ms(&alone.to_query, 0.99), ms(&alone.to_sse, 0.99));
        let ratio = (q / tq).max(s / ts);
        report.row(
            &format!(
                "collection of {COLLECTION_TESTS} tests, {learners} learners: freshness at {rate:.0} submissions/s"
            ),
            format!(
                "to query p99 {q:.1} ms, to SSE p99 {s:.1} ms (board of {learners} composed in {:.1} s)",
                composed.as_secs_f64()
            ),
            format!("one of its tests' boards: to query p99 {tq:.1} ms, to SSE p99 {ts:.1} ms"),
            Some(ratio),
            "p99 ≤ 2 × the test board's",
            Some(ratio <= 2.0),
        );
        anyhow::Ok(())
    }
    .await;
    cleanup_nats(&prefix).await;
    db.drop().await?;
    result
}

/// The first page of the backlog's test (`submissions` of them, seeded in
/// January 2026) as of a past instant after all of them: a different
/// instant on each request (each board folded from every submission), then
/// one instant over and over (kept in memory).
async fn as_of_rows(
    server: &Server,
    test_id: uuid::Uuid,
    submissions: u64,
    sizes: &Sizes,
    report: &mut Report,
) -> anyhow::Result<()> {
    eprintln!("as_of boards…");
    let api = Api::new(&server.address)?;
    let viewer = Arc::new(vec![api.token("viewer", Role::User)]);
    let page = move |i: u64| {
        format!(
            "/v1/tests/{test_id}/leaderboard?limit=50&as_of=2026-01-03T00:00:00.{:06}Z",
            i % 1_000_000
        )
    };
    let uncached = closed_loop(server.addr, viewer.clone(), 1, sizes.secs, Arc::new(page)).await?;
    let (p50, p99) = (ms(&uncached.latency, 0.5), ms(&uncached.latency, 0.99));
    report.row(
        &format!(
            "as_of: first page folded from {submissions} submissions (uncached), 1 connection"
        ),
        format!(
            "{:.1} req/s, p50 {p50:.1} / p99 {p99:.1} ms",
            uncached.per_second
        ),
        "—".into(),
        None,
        "p99 ≤ 250 ms",
        Some(p99 <= 250.0),
    );
    // Kept: one instant over and over, alone (as the uncached figure) and
    // under 64 connections.
    for connections in [1, CONNECTIONS] {
        let cached = closed_loop(
            server.addr,
            viewer.clone(),
            connections,
            sizes.secs,
            Arc::new(move |_| page(0)),
        )
        .await?;
        let (p50, p99) = (ms(&cached.latency, 0.5), ms(&cached.latency, 0.99));
        let alone = connections == 1;
        report.row(
            &format!(
                "as_of: first page of {submissions} submissions (cached), {connections} connection{}",
                if alone { "" } else { "s" }
            ),
            format!(
                "{:.0} req/s, p50 {p50:.2} / p99 {p99:.2} ms",
                cached.per_second
            ),
            "—".into(),
            None,
            if alone { "p99 ≤ 10 ms" } else { "measured" },
            alone.then_some(p99 <= 10.0),
        );
        if alone {
            report
                .latencies
                .push(("as_of first page, cached".into(), cached.latency));
        }
    }
    // Rank history: a fold of the whole board for each request.
    let history = closed_loop(
        server.addr,
        Arc::new(vec![api.token("viewer", Role::User)]),
        1,
        sizes.secs,
        Arc::new(move |i| {
            let user = i * 7919 % submissions + 1;
            format!("/v1/tests/{test_id}/leaderboard/users/user-{user}/history")
        }),
    )
    .await?;
    let (p50, p99) = (ms(&history.latency, 0.5), ms(&history.latency, 0.99));
    report.row(
        &format!("rank history of a learner on a board of {submissions} submissions, 1 connection"),
        format!(
            "{:.1} req/s, p50 {p50:.1} / p99 {p99:.1} ms",
            history.per_second
        ),
        "—".into(),
        None,
        "measured",
        None,
    );
    report
        .latencies
        .push(("rank history (a fold per request)".into(), history.latency));
    report
        .latencies
        .push(("as_of first page, uncached".into(), uncached.latency));
    Ok(())
}

/// The machine, the versions and the date.
async fn machine() -> Vec<(String, String)> {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .map(|l| l.trim().to_string())
        .unwrap_or_default();
    let command = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let postgres = match ScratchDb::create(1).await {
        Ok(db) => {
            let version: String = sqlx::query_scalar("SHOW server_version")
                .fetch_one(&db.pool)
                .await
                .unwrap_or_default();
            let _ = db.drop().await;
            version
        }
        Err(_) => String::new(),
    };
    let nats = async_nats_version().await.unwrap_or_default();
    let redis = command("redis-cli", &["INFO", "server"])
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or_default()
        .trim()
        .to_string();
    vec![
        (
            "date".into(),
            chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        ),
        ("CPU".into(), format!("{cpu}, {cores} cores")),
        ("memory".into(), memory),
        (
            "kernel".into(),
            read("/proc/sys/kernel/osrelease").trim().to_string(),
        ),
        ("rustc".into(), command("rustc", &["--version"])),
        ("Postgres".into(), postgres),
        ("NATS".into(), nats),
        ("Redis".into(), redis),
        (
            "note".into(),
            "Postgres, NATS, Redis, Podium and the load generator share the machine".into(),
        ),
    ]
}

async fn async_nats_version() -> Option<String> {
    let bus = podium_nats::EventBus::connect(&nats_url(), "benchversion")
        .await
        .ok()?;
    bus.client().flush().await.ok()?;
    Some(bus.client().server_info().version)
}

/// Deletes the run's NATS streams.
async fn cleanup_nats(prefix: &str) {
    if let Ok(bus) = podium_nats::EventBus::connect(&nats_url(), prefix).await {
        for stream in [
            bus.subjects().events_stream(),
            bus.subjects().dead_letter_stream(),
        ] {
            let _ = bus.jetstream().delete_stream(stream).await;
        }
    }
}
