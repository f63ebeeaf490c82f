//! Podium's read models and the machinery that keeps them.
//!
//! - [`checkpointed`]: a projection applies events and advances its checkpoint
//!   in one Postgres transaction, so a redelivered event is skipped and
//!   nothing is applied twice.
//! - [`fold`]: a read model folded in memory and written with COPY, for
//!   rebuilds at the speed of the log.
//! - [`fence`]: lease tokens that fence an ex-owner's writes, and which
//!   failures are transient.
//! - [`ranking`]: the leaderboard rules, pure (and an in-memory board).
//! - [`ranked_set`], [`board_index`]: an order-statistic set, and a compact
//!   leaderboard in memory built on it (ranks in O(log n)).
//! - [`leaderboard`], [`feed`], [`attempts`]: the projections and their stores.
//! - [`catalog`]: the published tests.
//! - [`memory`]: every read model in memory, for the embedded mode.
//! - [`tables`]: live tables versus the `__next` copies a replay fills.
//! - [`windows`]: a test's boards per day, week and month beside all time.
//! - [`collections`]: boards of the sum of best scores over a set of tests.
//! - [`history`]: a user's rank after each of their submissions.
#![forbid(unsafe_code)]

pub mod attempts;
pub mod board_index;
pub mod catalog;
pub mod checkpointed;
pub mod collections;
pub mod feed;
pub mod fence;
pub mod fold;
pub mod history;
pub mod leaderboard;
pub mod memory;
pub mod ranked_set;
pub mod ranking;
pub mod tables;
pub mod windows;

pub use checkpointed::{
    begin_writing_no_events, checkpoint_of, ApplyError, BoxError, Checkpointed, ProjectionLogic,
};
pub use fence::{is_transient, Fence};
pub use tables::Generation;
