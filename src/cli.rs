//! The command line: `podium serve | migrate | token`.

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
    /// Write a published test and many users' attempts straight into the
    /// event store, for benchmarks (replay them into the read models).
    Seed(SeedArgs),
}

#[derive(Debug, clap::Args)]
pub struct SeedArgs {
    /// How many attempts (users) to write: two events each.
    #[arg(long)]
    pub bulk: u64,
    #[command(flatten)]
    pub database: DatabaseSettings,
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Which read model to rebuild.
    #[arg(long, value_enum, default_value = "all")]
    pub projection: crate::replay::Target,
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
            app.run_until(crate::shutdown::signal()).await
        }
        Command::Migrate(database) => {
            let pool = crate::db::connect(&database).await?;
            crate::db::migrate(&pool).await?;
            eprintln!("migrations applied");
            Ok(())
        }
        Command::Seed(args) => {
            let pool = crate::db::connect(&args.database).await?;
            crate::db::migrate(&pool).await?;
            let mut progress = |done, total| eprintln!("seed: {done}/{total} attempts");
            let (test_id, events) = crate::seed::bulk(&pool, args.bulk, &mut progress).await?;
            println!("test {test_id}: {events} events written; run `podium replay` to build the read models");
            Ok(())
        }
        Command::Replay(args) => {
            let pool = crate::db::connect(&args.database).await?;
            crate::db::migrate(&pool).await?;
            let mut progress = crate::replay::stderr_progress();
            for rebuilt in crate::replay::replay(&pool, args.projection, &mut progress).await? {
                eprintln!(
                    "replay {}: rebuilt and swapped in at seq {}",
                    rebuilt.projection, rebuilt.checkpoint
                );
            }
            Ok(())
        }
        Command::Token(args) => {
            let secret = args
                .auth
                .jwt_secret
                .context("PODIUM_JWT_SECRET is not set: no secret to sign with")?;
            let keys = JwtKeys::new(secret.expose())?;
            let sub = UserId::parse(args.sub).context("--sub is not a valid user id")?;
            println!(
                "{}",
                keys.issue(&sub, args.role, Duration::from_secs(args.ttl))
            );
            Ok(())
        }
    }
}
