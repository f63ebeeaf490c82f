//! Logging: `tracing` to stderr, filtered by `RUST_LOG` (default `info`);
//! and, when `SENTRY_DSN` is set, errors reported to Sentry (warnings and
//! below ride along as breadcrumbs). Sentry sends from a background thread
//! with a bounded queue: an unreachable Sentry drops reports, never requests.

use std::time::Duration;

use anyhow::Context;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::Secret;

/// Logging only (tests start many apps in one process; a second call keeps
/// the first set-up).
pub fn init() {
    let _ = init_with_sentry(None);
}

/// Logging, plus Sentry when `dsn` is given; keep the guard for the life of
/// the process (dropping it flushes what is queued, for at most a second).
pub fn init_with_sentry(dsn: Option<&Secret>) -> anyhow::Result<Option<sentry::ClientInitGuard>> {
    let guard = match dsn {
        Some(dsn) => {
            let dsn: sentry::types::Dsn = dsn
                .expose()
                .parse()
                .context("SENTRY_DSN is not a valid Sentry DSN")?;
            Some(sentry::init(sentry::ClientOptions {
                dsn: Some(dsn),
                release: sentry::release_name!(),
                shutdown_timeout: Duration::from_secs(1),
                ..Default::default()
            }))
        }
        None => None,
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colours only for people: log collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(
            guard
                .as_ref()
                .map(|_| sentry::integrations::tracing::layer()),
        )
        .try_init();
    if guard.is_some() {
        tracing::info!("errors are reported to Sentry");
    }
    Ok(guard)
}
