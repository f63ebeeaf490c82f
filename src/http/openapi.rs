//! `GET /openapi.json`: the OpenAPI 3.1 document of the API, generated from
//! the handlers' annotations. A test checks that every route the router
//! serves is in it.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use super::routes::{attempts, catalog, demo, feed, health, history, leaderboard, notifications};
use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(document))
}

/// An RFC 9457 problem: every error answer (`application/problem+json`).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Problem {
    /// `urn:podium:problem:<kind>`, e.g. `urn:podium:problem:already-submitted`.
    r#type: String,
    title: String,
    status: u16,
    detail: String,
    /// For 422: what is wrong with which field.
    errors: Option<Vec<FieldProblem>>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct FieldProblem {
    field: String,
    message: String,
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "HS256 token with `sub`, `role` (user or admin) and `exp`; \
                         streams also take `?access_token=`",
                    ))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Podium",
        description = "Event-sourced backend for exam and test-prep platforms: commands, \
                       leaderboards, notification feeds and their live streams. Every \
                       response may carry `RateLimit-Limit`, `RateLimit-Remaining` and \
                       `RateLimit-Reset`; any request may be refused with 429 and \
                       `Retry-After` when a budget is spent."
    ),
    paths(
        health::healthz,
        health::ready,
        health::metrics,
        document,
        demo::page,
        catalog::list,
        catalog::publish,
        catalog::show,
        catalog::archive,
        attempts::start,
        attempts::show,
        attempts::answer,
        attempts::submit,
        notifications::send,
        notifications::mark_read,
        notifications::read_all,
        leaderboard::page,
        leaderboard::around,
        leaderboard::stream,
        feed::page,
        feed::unread_count,
        feed::stream,
        history::list,
    ),
    components(schemas(Problem, FieldProblem)),
    modifiers(&BearerAuth),
    tags(
        (name = "tests", description = "Publishing and reading tests"),
        (name = "attempts", description = "Taking tests"),
        (name = "notifications", description = "Notification commands, feeds and streams"),
        (name = "leaderboards", description = "Rankings, neighbours and live changes"),
        (name = "operations", description = "Probes, metrics and this document"),
    )
)]
pub struct ApiDoc;

/// The OpenAPI 3.1 document of this API.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json"))
)]
async fn document() -> impl IntoResponse {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let json = DOCUMENT.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .expect("the document serializes")
    });
    ([(header::CONTENT_TYPE, "application/json")], json.as_str())
}
