//! Podium's read models and the machinery that keeps them: each projection
//! turns log events into read-model changes, applied in Postgres together with
//! its checkpoint in one transaction ([`checkpointed`]), so a redelivered event
//! is skipped and nothing is applied twice.
#![forbid(unsafe_code)]

pub mod checkpointed;

pub use checkpointed::{ApplyError, BoxError, Checkpointed, ProjectionLogic};
