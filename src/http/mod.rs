//! The HTTP API: one router per resource, merged here, with the layers every
//! request passes through (request ids, tracing, body limit, idempotency,
//! panics turned into problem+json).

mod attempts;
mod catalog;
pub mod error;
pub mod extract;
mod feed;
mod health;
mod history;
pub mod idempotency;
mod leaderboard;
mod notifications;
mod pagination;
pub mod sse;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::HeaderName;
use axum::response::IntoResponse;
use axum::{middleware, Router};
use sqlx::PgPool;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use tokio::sync::watch;

use crate::auth::JwtKeys;
use crate::cache::QueryCache;
use crate::changes::ChangeHub;
use crate::config::QuerySettings;
use crate::eventstore::Aggregates;
use crate::metrics::Metrics;
use error::ApiError;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The primary: commands and the event store.
    pub pool: PgPool,
    /// Where queries read: a replica when `DATABASE_READ_URL` is set.
    pub read_pool: PgPool,
    pub aggregates: Arc<Aggregates>,
    pub keys: Arc<JwtKeys>,
    /// Largest accepted request body, in bytes.
    pub body_limit: usize,
    /// The NATS connection, when configured.
    pub bus: Option<podium_nats::EventBus>,
    /// Change notifications, routed to this instance's SSE streams.
    pub hub: Arc<ChangeHub>,
    pub cache: QueryCache,
    pub metrics: Metrics,
    /// Open SSE streams per user.
    pub streams: Arc<sse::StreamSlots>,
    pub query: Arc<QuerySettings>,
    /// Turns true when the server shuts down: streams end cleanly.
    pub shutdown: watch::Receiver<bool>,
}

pub fn router(state: AppState) -> Router {
    let body_limit = state.body_limit;
    Router::new()
        .merge(health::router())
        .merge(catalog::router())
        .merge(attempts::router())
        .merge(notifications::router())
        .merge(leaderboard::router())
        .merge(feed::router())
        .merge(history::router())
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            idempotency::middleware,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("the request handler panicked").into_response()
        }))
        .layer(TraceLayer::new_for_http())
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}
