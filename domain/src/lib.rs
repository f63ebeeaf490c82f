//! Podium's domain: the aggregates that decide what happens when learners take
//! tests and receive notifications, the commands they accept, the events they
//! record, and the grading rules.
//!
//! Pure by design: no I/O, no clock, no database. Everything an aggregate needs
//! to decide (the current time, the test a learner is attempting) arrives in its
//! command, so every rule can be tested with cqrs-es's given/when/then framework.
//!
//! Layout: one folder per aggregate (`test/`, `attempt/`, `notification/`), each
//! with `aggregate.rs`, `commands.rs` and `events.rs` (`collection/`, small, in
//! one file); shared value types in
//! [`ids`], [`validation`], [`metadata`] and [`time`]; event upcasting in [`upcasting`];
//! the log as readers see it (ordered, decodable) in [`log`].
#![forbid(unsafe_code)]

pub mod attempt;
pub mod collection;
pub mod ids;
pub mod log;
pub mod metadata;
pub mod notification;
pub mod test;
pub mod time;
pub mod upcasting;
pub mod validation;

pub use ids::UserId;
pub use metadata::EventMetadata;
pub use validation::{FieldError, ValidationErrors};

/// The version every event type is written with today. Bump it for an event
/// whose payload changes shape, and add an upcaster in [`upcasting`].
pub const EVENT_VERSION: &str = "1.0";
