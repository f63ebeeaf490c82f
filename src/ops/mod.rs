//! What every stage leans on and nothing of Podium's own: database
//! pools and migrations, leases for background roles, the metrics registry,
//! logging, the shutdown signal and the operator API's port. May use `config`; no other module of the
//! crate.

pub mod db;
pub mod lease;
pub mod metrics;
pub mod operator;
pub mod shutdown;
pub mod telemetry;
