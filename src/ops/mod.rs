//! What every stage leans on and nothing of Podium's own: database
//! pools and migrations, leases for background roles, the metrics registry,
//! logging and the shutdown signal. May use `config`; no other module of the
//! crate.

pub mod db;
pub mod lease;
pub mod metrics;
pub mod shutdown;
pub mod telemetry;
