//! The API's resources, one module each: its handlers, its router and its
//! OpenAPI annotations. May use the rest of `http/` and the query and
//! command sides; nothing here is used outside `http/`.

pub(super) mod attempts;
pub(super) mod catalog;
pub(super) mod demo;
pub(super) mod feed;
pub(super) mod health;
pub(super) mod history;
pub(super) mod leaderboard;
pub(super) mod notifications;

use axum::Router;

use super::AppState;

/// Every resource's routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .merge(health::router())
        .merge(demo::router())
        .merge(catalog::router())
        .merge(attempts::router())
        .merge(notifications::router())
        .merge(leaderboard::router())
        .merge(feed::router())
        .merge(history::router())
}
