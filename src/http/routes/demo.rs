//! The live demo page at `GET /`: one static HTML file (inline CSS and JS,
//! nothing fetched from elsewhere) that uses the public API like any client.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::http::AppState;

const PAGE: &str = include_str!("../../../static/index.html");

pub fn router() -> Router<AppState> {
    Router::new().route("/", get(page))
}

/// This resource's operations in the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(page))]
pub(super) struct Doc;

/// The live demo page: pick a test, watch its leaderboard move over SSE,
/// look up a user's neighbours, read your notifications.
#[utoipa::path(get, path = "/", tag = "operations",
    responses((status = 200, description = "The demo page", content_type = "text/html")))]
pub(super) async fn page() -> impl IntoResponse {
    static_page(PAGE)
}

/// One of Podium's pages: HTML with its CSS and JS inline, allowed to talk
/// to this server only.
pub(super) fn static_page(html: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 img-src 'self' data:; connect-src 'self'",
            ),
        ],
        html,
    )
}
