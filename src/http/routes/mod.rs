//! The API's resources, one module each: its handlers, its router and its
//! OpenAPI annotations. May use the rest of `http/` and the query and
//! command sides; nothing here is used outside `http/`.

mod admin;
mod attempts;
mod catalog;
mod collections;
mod delivery;
mod demo;
mod feed;
mod health;
mod history;
mod leaderboard;
mod notifications;

use axum::Router;
use utoipa::OpenApi as _;

use super::AppState;

/// A resource: its routes, and their OpenAPI document.
type Resource = (fn() -> Router<AppState>, fn() -> utoipa::openapi::OpenApi);

/// Every resource, once: the router and the document both come from here.
const RESOURCES: [Resource; 11] = [
    (health::router, health::Doc::openapi),
    (demo::router, demo::Doc::openapi),
    (catalog::router, catalog::Doc::openapi),
    (attempts::router, attempts::Doc::openapi),
    (notifications::router, notifications::Doc::openapi),
    (leaderboard::router, leaderboard::Doc::openapi),
    (collections::router, collections::Doc::openapi),
    (feed::router, feed::Doc::openapi),
    (history::router, history::Doc::openapi),
    (admin::router, admin::Doc::openapi),
    (delivery::router, delivery::Doc::openapi),
];

/// Every resource's routes.
pub fn router() -> Router<AppState> {
    RESOURCES
        .iter()
        .fold(Router::new(), |router, (routes, _)| router.merge(routes()))
}

/// Every resource's operations, for the OpenAPI document.
pub fn documents() -> impl Iterator<Item = utoipa::openapi::OpenApi> {
    RESOURCES.iter().map(|(_, document)| document())
}
