//! A Podium server in a child process (this binary in `serve` mode), so that
//! its memory is measured alone.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

pub const SECRET: &str = "podium-bench-secret-0123456789abcdef012345";

/// Server mode: settings from the parent's environment; prints the port and
/// serves until stdin closes.
pub async fn serve() -> anyhow::Result<()> {
    // Its log to stderr, filtered by RUST_LOG (PODIUM_BENCH_SERVER_LOG).
    podium::ops::telemetry::init();
    let mut settings = podium::Settings::new(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        std::env::var("DATABASE_URL")?,
        SECRET.into(),
    );
    // No database and no NATS: the embedded mode.
    settings.database.database_url = settings
        .database
        .database_url
        .take()
        .filter(|url| !url.expose().is_empty());
    settings.nats.nats_url = std::env::var("NATS_URL").ok().filter(|u| !u.is_empty());
    settings.nats.nats_prefix = std::env::var("PODIUM_NATS_PREFIX")?;
    settings.query.sse_max_streams_per_user = 100_000;
    settings.rate_limits = std::env::var("PODIUM_RATE_LIMITS")?
        .parse()
        .map_err(|err: String| anyhow::anyhow!(err))?;
    settings.http_metrics = std::env::var("PODIUM_HTTP_METRICS")? == "true";
    settings.workers = std::env::var("PODIUM_WORKERS")? == "true";
    if std::env::var("PODIUM_QUERY_CACHE")? != "true" {
        settings.query.cache_max_bytes = 0;
    }
    // Delivery from its own variables (PODIUM_SMTP_URL…), as `podium serve` reads them.
    #[derive(clap::Parser)]
    struct DeliveryEnv {
        #[command(flatten)]
        delivery: podium::config::DeliverySettings,
    }
    settings.delivery = <DeliveryEnv as clap::Parser>::parse_from(["serve"]).delivery;
    let app = podium::Application::build(settings).await?;
    println!("PORT {}", app.port());
    app.run_until(async {
        let mut line = String::new();
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
        let _ = stdin.read_line(&mut line).await;
    })
    .await
}

/// How a server is started.
pub struct Options<'a> {
    /// Empty (with an empty `nats_url`): the embedded mode.
    pub database_url: &'a str,
    /// Empty: no NATS (no relay, no workers, no cache).
    pub nats_url: &'a str,
    pub prefix: &'a str,
    pub rate_limits: &'a str,
    pub metrics: bool,
    pub workers: bool,
    /// The query cache (off: every read reaches the read store).
    pub cache: bool,
}

impl<'a> Options<'a> {
    /// A server as deployed: workers, the cache and metrics on, rate limits
    /// off (the harness's clients are few users sending much).
    pub fn full(database_url: &'a str, nats_url: &'a str, prefix: &'a str) -> Self {
        Self {
            database_url,
            nats_url,
            prefix,
            rate_limits: "off",
            metrics: true,
            workers: true,
            cache: true,
        }
    }
}

pub struct Server {
    child: tokio::process::Child,
    pub address: String,
    pub addr: SocketAddr,
}

impl Server {
    pub async fn start(options: Options<'_>) -> anyhow::Result<Self> {
        Self::start_with(options, &[]).await
    }

    /// [`Self::start`] with `env` besides.
    pub async fn start_with(options: Options<'_>, env: &[(&str, String)]) -> anyhow::Result<Self> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("serve")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("DATABASE_URL", options.database_url)
            .env("NATS_URL", options.nats_url)
            .env("PODIUM_NATS_PREFIX", options.prefix)
            .env("PODIUM_RATE_LIMITS", options.rate_limits)
            .env("PODIUM_HTTP_METRICS", options.metrics.to_string())
            .env("PODIUM_WORKERS", options.workers.to_string())
            .env("PODIUM_QUERY_CACHE", options.cache.to_string())
            // PODIUM_BENCH_SERVER_LOG: the servers' log filter (warnings
            // only by default), to see what a scenario's server did.
            .env(
                "RUST_LOG",
                std::env::var("PODIUM_BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let port: u16 = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let line = lines
                    .next_line()
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("the server exited at start"))?;
                if let Some(port) = line.strip_prefix("PORT ") {
                    return anyhow::Ok(port.parse()?);
                }
            }
        })
        .await??;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        Ok(Self {
            child,
            address: format!("http://{addr}"),
            addr,
        })
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        let Some(pid) = self.child.id() else { return 0 };
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// CPU time the server has used (user and system), in seconds.
    pub fn cpu_secs(&self) -> f64 {
        self.child.id().and_then(process_cpu_secs).unwrap_or(0.0)
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Clock ticks a second in `/proc` (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

/// CPU time process `pid` has used (user and system), in seconds.
pub fn process_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses: utime and
    // stime are the 12th and 13th of them.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    Some((ticks(11)? + ticks(12)?) / TICKS)
}

/// CPU time the whole machine has spent busy (all but idle and waiting for
/// I/O), summed over its cores, in seconds.
pub fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<f64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal …
    let busy: f64 = fields
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    Some(busy / TICKS)
}

/// The NATS server at `url`'s port: the one `nats-server` process whose
/// command line names that port, or the only one when none does (started
/// on its default port).
pub fn nats_server_pid(url: &str) -> Option<u32> {
    let port = url
        .rsplit(':')
        .next()
        .unwrap_or("4222")
        .trim_end_matches('/');
    let servers: Vec<(u32, String)> = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim() == "nats-server").then_some(())?;
            let args = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            Some((pid, String::from_utf8_lossy(&args).replace('\0', " ")))
        })
        .collect();
    let named = servers
        .iter()
        .filter(|(_, args)| args.split([' ', ':']).any(|arg| arg == port));
    match named.map(|(pid, _)| *pid).collect::<Vec<_>>()[..] {
        [pid] => Some(pid),
        [] if servers.len() == 1 => Some(servers[0].0),
        _ => None,
    }
}
