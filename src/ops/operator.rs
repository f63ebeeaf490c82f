//! The operator API's port: what operators see of the projection engine
//! and ask of it (implemented over Postgres by
//! `projector::operations`), and the views it answers with.

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

/// One projection as operators see it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProjectionView {
    pub name: String,
    /// The seq of the last event applied.
    pub checkpoint: i64,
    /// The seq of the newest event in the log.
    pub head: i64,
    pub lag_events: i64,
    /// How long the checkpoint has stood still while events wait.
    pub lag_seconds: f64,
    /// `running`, `catching_up`, `rebuilding`, `halted` or `standby` (no
    /// instance runs it).
    pub state: &'static str,
    /// The instance running it, if any.
    pub owner: Option<String>,
    /// Dead letters not yet resolved.
    pub dead_letters: i64,
    /// Why it halted, while it is halted.
    pub halted: Option<String>,
    /// Whether `POST …/rebuild` applies (the notification policy issues
    /// commands and is not rebuilt).
    pub rebuildable: bool,
}

/// A rebuild's progress.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq)]
pub struct RebuildView {
    /// `rebuilding`, `done`, `failed` or `none`.
    pub state: &'static str,
    pub processed: i64,
    pub total: i64,
    pub events_per_sec: f64,
    pub eta_secs: Option<f64>,
    #[serde(serialize_with = "podium_domain::time::serialize_option")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "podium_domain::time::serialize_option")]
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    /// The instance (or `podium replay`) running it.
    pub runner: Option<String>,
}

/// A dead letter as operators see it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeadLetterView {
    pub id: i64,
    pub projection: String,
    pub seq: i64,
    pub event_type: String,
    pub error: String,
    /// How many times applying it failed, in all.
    pub failures: i32,
    /// When it last failed.
    #[serde(serialize_with = "podium_domain::time::serialize")]
    pub at: DateTime<Utc>,
    /// `open`, `retrying` (asked, not yet applied) or `skipping`.
    pub state: String,
}

/// Why an operator's request was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("no projection named {0:?}")]
    UnknownProjection(String),
    #[error("{0} issues commands (notifications) rather than keeping tables: it is not rebuilt")]
    NotRebuildable(String),
    #[error("a rebuild of {name} is already running ({progress})")]
    Running { name: String, progress: String },
    #[error("no dead letter with id {0}")]
    UnknownLetter(i64),
    #[error("dead letter {0} is resolved already (applied or skipped)")]
    Resolved(i64),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// The projection engine as operators see it and act on it.
#[async_trait::async_trait]
pub trait Operator: Send + Sync {
    /// Every projection with its owner, state and lag.
    async fn projections(&self) -> Result<Vec<ProjectionView>, sqlx::Error>;
    /// Asks for a rebuild of `name`; its owner starts it within a second.
    async fn request_rebuild(&self, name: &str) -> Result<(), Refused>;
    /// The last rebuild of `name`, or the one running.
    async fn rebuild(&self, name: &str) -> Result<RebuildView, Refused>;
    /// Unresolved dead letters, oldest first, after id `after`.
    async fn dead_letters(
        &self,
        projection: Option<&str>,
        limit: i64,
        after: i64,
    ) -> Result<Vec<DeadLetterView>, Refused>;
    /// Asks the projection's owner to apply dead letter `id` again (in order:
    /// the projection is stopped right before it).
    async fn retry(&self, id: i64) -> Result<(), Refused>;
    /// Asks the projection's owner to go on without dead letter `id`.
    async fn skip(&self, id: i64) -> Result<(), Refused>;
}
