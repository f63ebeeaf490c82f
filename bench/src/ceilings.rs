//! Ceilings measured in the same run, so every result is a ratio: the
//! command shape at this Postgres (pgbench), reading and decoding the log,
//! and a Redis sorted set of the same size (what the old stack used).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use podium::log::postgres::LogCursor;
use sqlx::PgPool;

/// pgbench with the command script (read an aggregate's events, append one)
/// at `clients` clients for `duration`: transactions per second.
pub fn pgbench_command(
    database_url: &str,
    clients: u32,
    duration: Duration,
) -> anyhow::Result<f64> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/pgbench/command.sql");
    let output = Command::new("pgbench")
        .args(["-n", "-j", "2", "-c", &clients.to_string()])
        .args(["-T", &duration.as_secs().max(1).to_string(), "-f", script])
        .arg(database_url)
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "pgbench failed: {}{}",
        text,
        String::from_utf8_lossy(&output.stderr)
    );
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no tps in pgbench's output: {text}"))
}

/// Reads every event of the log with the log reader and decodes it: events
/// per second. The best any replay could do.
pub async fn read_log(pool: &PgPool) -> anyhow::Result<(u64, f64)> {
    let mut conn = pool.acquire().await?;
    let mut cursor = LogCursor::start();
    let started = Instant::now();
    loop {
        let (events, next) = cursor.peek(&mut conn, 1_000).await?;
        if events.is_empty() {
            break;
        }
        for event in &events {
            event.decode()?;
        }
        cursor = next;
    }
    Ok((
        cursor.seq,
        cursor.seq as f64 / started.elapsed().as_secs_f64(),
    ))
}

/// Redis figures for a sorted set of `members`.
pub struct Redis {
    /// ZREVRANK of random members, per second.
    pub rank_per_second: f64,
    /// ZREVRANGE of 11 members around the middle, per second.
    pub range_per_second: f64,
    pub rank_p99_ms: f64,
}

impl Redis {
    /// A rank and its neighbours, as pairs per second.
    pub fn pairs_per_second(&self) -> f64 {
        1.0 / (1.0 / self.rank_per_second + 1.0 / self.range_per_second)
    }
}

const KEY: &str = "podium-bench:lb";

/// Fills a sorted set with `members` (named as redis-benchmark's
/// `__rand_int__` names them) and measures lookups at `clients` clients.
pub fn redis(members: u64, clients: u32, requests: u64) -> anyhow::Result<Redis> {
    let mut cli = Command::new("redis-cli")
        .arg("--pipe")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    {
        let mut stdin = std::io::BufWriter::new(cli.stdin.take().expect("piped"));
        write!(stdin, "*2\r\n$3\r\nDEL\r\n${}\r\n{KEY}\r\n", KEY.len())?;
        for i in 0..members {
            let score = (i * 7919 % 101).to_string();
            let member = format!("m:{i:012}");
            write!(
                stdin,
                "*4\r\n$4\r\nZADD\r\n${}\r\n{KEY}\r\n${}\r\n{score}\r\n${}\r\n{member}\r\n",
                KEY.len(),
                score.len(),
                member.len()
            )?;
        }
    }
    anyhow::ensure!(
        cli.wait()?.success(),
        "redis-cli --pipe failed (is Redis up?)"
    );
    let bench = |command: &[&str]| -> anyhow::Result<(f64, f64)> {
        let output = Command::new("redis-benchmark")
            .args([
                "-q",
                "--csv",
                "-c",
                &clients.to_string(),
                "-n",
                &requests.to_string(),
            ])
            .args(["-r", &members.to_string()])
            .args(command)
            .output()?;
        let text = String::from_utf8_lossy(&output.stdout);
        // "command","rps","avg","min","p50","p95","p99","max"
        let row = text
            .lines()
            .find(|l| !l.starts_with("\"test\""))
            .ok_or_else(|| anyhow::anyhow!("no redis-benchmark result: {text}"))?;
        let fields: Vec<f64> = row
            .split(',')
            .skip(1)
            .filter_map(|f| f.trim_matches('"').parse().ok())
            .collect();
        anyhow::ensure!(
            fields.len() >= 6,
            "unexpected redis-benchmark output: {row}"
        );
        Ok((fields[0], fields[5]))
    };
    let (rank_per_second, rank_p99_ms) = bench(&["ZREVRANK", KEY, "m:__rand_int__"])?;
    let middle = (members / 2).to_string();
    let end = (members / 2 + 10).to_string();
    let (range_per_second, _) = bench(&["ZREVRANGE", KEY, &middle, &end])?;
    let _ = Command::new("redis-cli").args(["DEL", KEY]).output();
    Ok(Redis {
        rank_per_second,
        range_per_second,
        rank_p99_ms,
    })
}
