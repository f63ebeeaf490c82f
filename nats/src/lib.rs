//! Podium's NATS JetStream adapter.
//!
//! - [`subjects`]: how subjects and stream names are laid out under a prefix,
//!   so several deployments or test runs can share one NATS server.
//! - [`bus`]: connecting, creating the streams idempotently, publishing log
//!   events with de-duplication ids, and publishing "changed" notifications.
//! - [`worker`]: the projection-worker runtime — an ordered consumer started
//!   at the projection's own checkpoint, applying natural batches strictly in
//!   log order; transient failures are retried for as long as they last, an
//!   event that fails by itself is dead-lettered.
//!
//! Everything here works with nats-server 2.9: one filter subject per consumer.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod bus;
pub mod subjects;
pub mod worker;

pub use backoff::{stopped_during, Backoff};
pub use bus::{BusError, EventBus, StreamLimits, StreamPosition};
pub use subjects::Subjects;
pub use worker::{
    Applied, DeadLetter, DeadLetterPolicy, Projection, ProjectionError, Worker, WorkerConfig,
    WorkerError, WorkerStats,
};
