//! `GET /openapi.json`: the OpenAPI 3.1 document of the API, generated from
//! the handlers' annotations, resource by resource from the list that also
//! builds the router (`routes/mod.rs`). Error answers are declared once
//! here: every 4xx and 5xx is a [`Problem`], and every `/v1` operation may
//! answer 401, 429, 500 and 503, and one with a JSON body 400, 413, 415 and 422. A test checks that every route the router
//! serves is in it.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::Problem;
use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(document))
}

/// Error answers, declared once for every operation.
struct ProblemResponses;

impl Modify for ProblemResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        let problem = |description: &str| {
            let content = ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build();
            ResponseBuilder::new()
                .description(description)
                .content("application/problem+json", content)
                .build()
        };
        const COMMON: [(&str, &str); 4] = [
            ("401", "No or bad token (`unauthorized`)"),
            (
                "429",
                "A rate limit is spent (`rate-limited`); `Retry-After` says when to retry",
            ),
            (
                "500",
                "A bug (`internal-error`); the request id is in the logs",
            ),
            (
                "503",
                "The database is unavailable (`service-unavailable`); retry later",
            ),
        ];
        // Whatever an operation with a JSON body may answer about the body.
        const BODY: [(&str, &str); 4] = [
            ("400", "The body is not JSON (`malformed-request`)"),
            (
                "413",
                "The body is larger than `PODIUM_BODY_LIMIT` (`payload-too-large`)",
            ),
            (
                "415",
                "The body is not `application/json` (`unsupported-media-type`)",
            ),
            (
                "422",
                "The body is not what the operation takes (`invalid-values`)",
            ),
        ];
        // The probes, the demo page and this document answer as they say.
        let api = openapi
            .paths
            .paths
            .iter_mut()
            .filter(|(path, _)| path.starts_with("/v1/"));
        for (_, item) in api {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for operation in operations.into_iter().flatten() {
                let responses = &mut operation.responses.responses;
                for (status, response) in responses.iter_mut() {
                    let failed = status.starts_with('4') || status.starts_with('5');
                    if let (true, RefOr::T(response)) = (failed, response) {
                        *response = problem(&response.description);
                    }
                }
                let with_body = operation.request_body.is_some();
                let body_answers = with_body.then_some(BODY).into_iter().flatten();
                for (status, description) in COMMON.into_iter().chain(body_answers) {
                    responses
                        .entry(status.to_string())
                        .or_insert_with(|| RefOr::T(problem(description)));
                }
            }
        }
    }
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
    paths(document),
    components(schemas(Problem)),
    modifiers(&BearerAuth),
    tags(
        (name = "tests", description = "Publishing and reading tests"),
        (name = "attempts", description = "Taking tests"),
        (name = "notifications", description = "Notification commands, feeds and streams"),
        (name = "leaderboards", description = "Rankings, neighbours and live changes"),
        (name = "collections", description = "Sets of tests ranked together"),
        (name = "delivery", description = "Email settings and signed webhooks"),
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
        let mut doc = ApiDoc::openapi();
        for resource in super::routes::documents() {
            doc.merge(resource);
        }
        ProblemResponses.modify(&mut doc);
        doc.to_json().expect("the document serializes")
    });
    ([(header::CONTENT_TYPE, "application/json")], json.as_str())
}
