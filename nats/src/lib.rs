//! Podium's NATS JetStream adapter.
//!
//! - [`subjects`]: how subjects and stream names are laid out under a prefix,
//!   so several deployments or test runs can share one NATS server.
//! - [`bus`]: connecting, creating the streams idempotently, publishing log
//!   events with de-duplication ids, and publishing "changed" notifications.
//! - [`worker`]: the projection-worker runtime — a durable pull consumer per
//!   projection that applies events strictly in log order, acknowledges only
//!   after the projection committed, retries with backoff and dead-letters.
//!
//! Everything here works with nats-server 2.9: one filter subject per consumer.
#![forbid(unsafe_code)]

pub mod bus;
pub mod subjects;
pub mod worker;

pub use bus::{BusError, ConsumerBacklog, EventBus, StreamLimits};
pub use subjects::Subjects;
pub use worker::{
    Applied, DeadLetterPolicy, Projection, ProjectionError, Worker, WorkerConfig, WorkerStats,
};
