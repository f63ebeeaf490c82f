//! The `podium` binary's library: configuration, the HTTP API (commands,
//! queries, auth, problem+json errors, idempotency), the event-store wiring and
//! the command line. `main.rs` only parses the command line and calls [`cli::run`];
//! tests start the same [`app::Application`] on port 0.
#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod backend;
pub mod cache;
pub mod changes;
pub mod cli;
pub mod clock;
pub mod config;
pub mod db;
pub mod demo;
pub mod embedded;
pub mod eventlog;
pub mod eventstore;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod policy;
pub mod projector;
pub mod ratelimit;
pub mod relay;
pub mod replay;
pub mod seed;
pub mod shutdown;
pub mod telemetry;

pub use app::Application;
pub use config::Settings;
