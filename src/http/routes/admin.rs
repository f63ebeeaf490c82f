//! The operator API (admin only): projections with their owner, state and
//! lag; rebuilds with progress; dead letters retried or skipped. And the
//! operator page at `GET /admin`, one static file like the demo page.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::http::error::ApiError;
use crate::http::extract::{Admin, ApiPath, ApiQuery};
use crate::http::pagination;
use crate::http::AppState;
use crate::ops::operator::{DeadLetterView, Operator, ProjectionView, RebuildView, Refused};

const PAGE: &str = include_str!("../../../static/admin.html");

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin", get(page))
        .route("/v1/admin/projections", get(projections))
        .route(
            "/v1/admin/projections/{name}/rebuild",
            post(start_rebuild).get(rebuild),
        )
        .route("/v1/admin/dead-letters", get(dead_letters))
        .route("/v1/admin/dead-letters/{id}/retry", post(retry))
        .route("/v1/admin/dead-letters/{id}/skip", post(skip))
}

/// This resource's operations in the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(page, projections, start_rebuild, rebuild, dead_letters, retry, skip))]
pub(super) struct Doc;

/// The operator page: projections with live lag, rebuilds with a progress
/// bar, dead letters with retry and skip. It signs in with an admin token.
#[utoipa::path(get, path = "/admin", tag = "operations",
    responses((status = 200, description = "The operator page", content_type = "text/html")))]
async fn page() -> impl IntoResponse {
    super::demo::static_page(PAGE)
}

/// The operator side, where there is one.
fn operations(state: &AppState) -> Result<&Arc<dyn Operator>, ApiError> {
    state.operations.as_ref().ok_or_else(|| {
        ApiError::NotFound(
            "the operator API needs Postgres: the embedded mode keeps its read models in memory \
             and rebuilds them at every start"
                .into(),
        )
    })
}

impl From<Refused> for ApiError {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::UnknownProjection(_) | Refused::UnknownLetter(_) => {
                ApiError::NotFound(refused.to_string())
            }
            Refused::NotRebuildable(_) => ApiError::Conflict {
                kind: "not-rebuildable",
                detail: refused.to_string(),
            },
            Refused::Running { .. } => ApiError::Conflict {
                kind: "rebuild-running",
                detail: refused.to_string(),
            },
            Refused::Resolved(_) => ApiError::Conflict {
                kind: "dead-letter-resolved",
                detail: refused.to_string(),
            },
            Refused::Database(err) => err.into(),
        }
    }
}

#[derive(Serialize, ToSchema)]
struct Projections {
    items: Vec<ProjectionView>,
}

/// Every projection: checkpoint, head of the log, lag, state, owner and
/// unresolved dead letters (admin).
#[utoipa::path(get, path = "/v1/admin/projections", tag = "operations",
    security(("bearer" = [])),
    responses(
        (status = 200, body = Projections),
        (status = 401, description = "No valid token"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "The embedded mode (no operator API)"),
    ))]
async fn projections(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<Projections>, ApiError> {
    let items = operations(&state)?.projections().await?;
    Ok(Json(Projections { items }))
}

#[derive(Serialize, ToSchema)]
struct RebuildStarted {
    name: String,
    /// `rebuilding`.
    state: &'static str,
}

/// Starts a rebuild of a read model from the whole log on the instance that
/// owns it (admin). The live read model keeps answering; the rebuilt one is
/// swapped in at the end.
#[utoipa::path(post, path = "/v1/admin/projections/{name}/rebuild", tag = "operations",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "A projection's name")),
    responses(
        (status = 202, body = RebuildStarted),
        (status = 401, description = "No valid token"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such projection"),
        (status = 409, description = "A rebuild of it is running, or it is not rebuilt (the notification policy)"),
    ))]
async fn start_rebuild(
    State(state): State<AppState>,
    _: Admin,
    ApiPath(name): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    operations(&state)?.request_rebuild(&name).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(RebuildStarted {
            name,
            state: "rebuilding",
        }),
    ))
}

/// The running or last rebuild of a read model, with its progress (admin).
#[utoipa::path(get, path = "/v1/admin/projections/{name}/rebuild", tag = "operations",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "A projection's name")),
    responses(
        (status = 200, body = RebuildView),
        (status = 401, description = "No valid token"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such projection"),
        (status = 409, description = "Not rebuilt (the notification policy)"),
    ))]
async fn rebuild(
    State(state): State<AppState>,
    _: Admin,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<RebuildView>, ApiError> {
    Ok(Json(operations(&state)?.rebuild(&name).await?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct LetterQuery {
    /// Only this projection's.
    projection: Option<String>,
    /// 1–200, default 50.
    limit: Option<i64>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// Where the next page of dead letters starts.
#[derive(Serialize, Deserialize)]
struct LetterCursor {
    #[serde(rename = "dl")]
    after: i64,
}

#[derive(Serialize, ToSchema)]
struct DeadLetters {
    items: Vec<DeadLetterView>,
    next_cursor: Option<String>,
}

/// Dead letters not yet resolved (neither applied since nor skipped), oldest
/// first (admin).
#[utoipa::path(get, path = "/v1/admin/dead-letters", tag = "operations",
    security(("bearer" = [])),
    params(LetterQuery),
    responses(
        (status = 200, body = DeadLetters),
        (status = 400, description = "Malformed cursor"),
        (status = 401, description = "No valid token"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such projection"),
        (status = 422, description = "Bad limit"),
    ))]
async fn dead_letters(
    State(state): State<AppState>,
    _: Admin,
    ApiQuery(query): ApiQuery<LetterQuery>,
) -> Result<Json<DeadLetters>, ApiError> {
    let limit = pagination::limit(query.limit)?;
    let after = match &query.cursor {
        Some(raw) => pagination::decode::<LetterCursor>(raw)?.after,
        None => 0,
    };
    // One more than asked says whether there is a next page.
    let mut items = operations(&state)?
        .dead_letters(query.projection.as_deref(), limit + 1, after)
        .await?;
    let next_cursor = (items.len() as i64 > limit).then(|| {
        items.truncate(limit as usize);
        pagination::encode(&LetterCursor {
            after: items.last().map_or(after, |letter| letter.id),
        })
    });
    Ok(Json(DeadLetters { items, next_cursor }))
}

/// Applies a dead-lettered event again, in order: its projection, halted
/// right before it, starts again from it (admin).
#[utoipa::path(post, path = "/v1/admin/dead-letters/{id}/retry", tag = "operations",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "The dead letter's id")),
    responses(
        (status = 400, description = "The id is not a number"),
        (status = 202, description = "The projection's owner applies it again"),
        (status = 401, description = "No valid token"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such dead letter"),
        (status = 409, description = "Resolved already (applied or skipped)"),
    ))]
async fn retry(
    State(state): State<AppState>,
    _: Admin,
    ApiPath(id): ApiPath<i64>,
) -> Result<StatusCode, ApiError> {
    operations(&state)?.retry(id).await?;
    Ok(StatusCode::ACCEPTED)
}

/// Goes on without a dead-lettered event: its projection moves past it
/// without applying it, and says so in a metric and a log line (admin).
#[utoipa::path(post, path = "/v1/admin/dead-letters/{id}/skip", tag = "operations",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "The dead letter's id")),
    responses(
        (status = 400, description = "The id is not a number"),
        (status = 204, description = "Recorded; the projection's owner skips it"),
        (status = 401, description = "No valid token"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such dead letter"),
        (status = 409, description = "Resolved already (applied or skipped)"),
    ))]
async fn skip(
    State(state): State<AppState>,
    _: Admin,
    ApiPath(id): ApiPath<i64>,
) -> Result<StatusCode, ApiError> {
    operations(&state)?.skip(id).await?;
    Ok(StatusCode::NO_CONTENT)
}
