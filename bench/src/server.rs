//! A Podium server in a child process (this binary in `serve` mode), so that
//! its memory is measured alone.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

pub const SECRET: &str = "podium-bench-secret-0123456789abcdef012345";

/// Server mode: settings from the parent's environment; prints the port and
/// serves until stdin closes.
pub async fn serve() -> anyhow::Result<()> {
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
            .env("RUST_LOG", "warn")
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
        // Clock ticks, 100 a second on Linux (USER_HZ).
        const TICKS: f64 = 100.0;
        let Some(pid) = self.child.id() else {
            return 0.0;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name, which is in parentheses: utime and
        // stime are the 12th and 13th of them.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
        ticks(11).unwrap_or(0.0) / TICKS + ticks(12).unwrap_or(0.0) / TICKS
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
