//! The command line: `podium serve | migrate | replay | token | seed`, with
//! the demo seed ([`demo_seed`]: a few tests and learners through the API)
//! and the bulk seed ([`bulk_seed`]: millions of events straight into the
//! log, for benchmarks). May use everything.

pub mod bulk_seed;
pub mod demo_seed;

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use podium_domain::UserId;

use crate::auth::{JwtKeys, Role};
use crate::config::{AuthSettings, DatabaseSettings, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "podium",
    version,
    about = "Event-sourced backend for exam and test-prep platforms"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP API (applies migrations first).
    Serve(Box<Settings>),
    /// Apply database migrations and exit.
    Migrate(DatabaseSettings),
    /// Print a bearer token signed with the configured secret.
    Token(TokenArgs),
    /// Rebuild read models from the event log and swap them in atomically.
    Replay(ReplayArgs),
    /// Demo data through a running server's API (tests, learners, attempts,
    /// announcements), or with `--bulk N` a published test and N users'
    /// attempts written straight into the event store, for benchmarks.
    Seed(SeedArgs),
}

#[derive(Debug, clap::Args)]
pub struct SeedArgs {
    /// Write this many attempts (users) straight into the event store
    /// instead (two events each; then run `podium replay`).
    #[arg(long)]
    pub bulk: Option<u64>,
    /// The server to fill with demo data. Its rate limits apply: run it with
    /// PODIUM_RATE_LIMITS=off for a fast seed.
    #[arg(long, env = "PODIUM_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Demo learners.
    #[arg(long, default_value_t = 300)]
    pub learners: usize,
    /// Demo attempts, spread over the learners and tests.
    #[arg(long, default_value_t = 2_000)]
    pub attempts: usize,
    #[command(flatten)]
    pub auth: AuthSettings,
    #[command(flatten)]
    pub database: DatabaseSettings,
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Which read model to rebuild.
    #[arg(long, value_enum, default_value = "all")]
    pub projection: crate::projector::replay::Scope,
    #[command(flatten)]
    pub database: DatabaseSettings,
}

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// The user id the token speaks for (its `sub` claim).
    #[arg(long)]
    pub sub: String,
    #[arg(long, value_enum, default_value = "user")]
    pub role: Role,
    /// Seconds until the token expires.
    #[arg(long, default_value_t = 3600)]
    pub ttl: u64,
    #[command(flatten)]
    pub auth: AuthSettings,
}

impl Cli {
    /// The command line; `podium` alone means `podium serve` (embedded
    /// when neither DATABASE_URL nor NATS_URL is set).
    pub fn parse_or_serve() -> Self {
        let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
        if args.len() == 1 {
            args.push("serve".into());
        }
        Self::parse_from(args)
    }

    /// Where errors are reported, for the commands that report them.
    pub fn sentry_dsn(&self) -> Option<&crate::config::Secret> {
        match &self.command {
            Command::Serve(settings) => settings.sentry_dsn.as_ref(),
            _ => None,
        }
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(settings) => {
            let app = crate::Application::build(*settings).await?;
            app.run_until(crate::ops::shutdown::signal()).await
        }
        Command::Migrate(database) => {
            let pool = crate::ops::db::connect(&database).await?;
            crate::ops::db::migrate(&pool).await?;
            eprintln!("migrations applied");
            Ok(())
        }
        Command::Seed(args) => match args.bulk {
            Some(attempts) => {
                let pool = crate::ops::db::connect(&args.database).await?;
                crate::ops::db::migrate(&pool).await?;
                let mut progress = |done, total| eprintln!("seed: {done}/{total} attempts");
                let (test_id, events) =
                    crate::cli::bulk_seed::bulk(&pool, attempts, &mut progress).await?;
                println!("test {test_id}: {events} events written; run `podium replay` to build the read models");
                Ok(())
            }
            None => {
                let keys = dev_or_configured_keys(&args.auth)?;
                let size = crate::cli::demo_seed::DemoSize {
                    learners: args.learners,
                    attempts: args.attempts,
                };
                eprintln!(
                    "seeding {} with {} attempts by {} learners…",
                    args.url, size.attempts, size.learners
                );
                let seeded = crate::cli::demo_seed::seed(&args.url, &keys, size).await?;
                println!("tests: {}", seeded.tests.join(" "));
                println!("collection of them: {}", seeded.collection);
                println!("demo admin token:   {}", seeded.admin_token);
                println!(
                    "demo learner ({}) token: {}",
                    seeded.learner, seeded.learner_token
                );
                let url = args.url.trim_end_matches('/');
                println!(
                    "try: curl -s {url}/v1/tests/{}/leaderboard -H \"authorization: Bearer {}\"",
                    seeded.tests[0], seeded.learner_token
                );
                println!(
                    "open the demo page as {}: {url}/?token={}",
                    seeded.learner, seeded.learner_token
                );
                Ok(())
            }
        },
        Command::Replay(args) => {
            let pool = crate::ops::db::connect(&args.database).await?;
            crate::ops::db::migrate(&pool).await?;
            let mut progress = crate::projector::replay::stderr_progress();
            // One rebuild of a read model at a time, whoever runs it: a
            // rebuild already running (through the operator API, or another
            // `podium replay`) refuses this one.
            let runner = format!("podium replay ({})", crate::ops::lease::new_instance_id());
            let rebuilt = crate::projector::operations::rebuild(
                &pool,
                &args.projection.read_models(),
                &runner,
                &mut progress,
            )
            .await?;
            for rebuilt in rebuilt {
                eprintln!(
                    "replay {}: rebuilt and swapped in at seq {}",
                    rebuilt.projection, rebuilt.checkpoint
                );
            }
            Ok(())
        }
        Command::Token(args) => {
            let keys = dev_or_configured_keys(&args.auth)?;
            let sub = UserId::parse(args.sub).context("--sub is not a valid user id")?;
            println!(
                "{}",
                keys.issue(&sub, args.role, Duration::from_secs(args.ttl))
            );
            Ok(())
        }
    }
}

/// Keys for `PODIUM_JWT_SECRET`, or for the embedded mode's development
/// secret (said on stderr) when it is not set.
fn dev_or_configured_keys(auth: &AuthSettings) -> anyhow::Result<JwtKeys> {
    let (secret, dev) = auth.secret_or_dev();
    if dev {
        eprintln!(
            "PODIUM_JWT_SECRET is not set: signing with the embedded mode's development secret \
             (tokens work only with a server that runs without PODIUM_JWT_SECRET)"
        );
    }
    JwtKeys::new(secret)
}
