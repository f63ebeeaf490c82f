//! The caller's attempts, newest first.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, Utc};
use podium_projections::attempts::AttemptSummary;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::Principal;
use crate::http::cached::JsonBody;
use crate::http::error::ApiError;
use crate::http::extract::ApiQuery;
use crate::http::pagination::{self, next_link};
use crate::http::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/me/attempts", get(list))
}

/// This resource's operations in the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(list))]
pub(super) struct Doc;

/// Attempts after the one started at `at` with id `id`, of `user`.
#[derive(Serialize, Deserialize)]
struct Cursor {
    #[serde(rename = "attempts")]
    user: String,
    at: DateTime<Utc>,
    id: Uuid,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// 1–200, default 50.
    limit: Option<i64>,
    /// A `next_cursor` of a previous page.
    cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct AttemptList {
    items: Vec<AttemptSummary>,
    next_cursor: Option<String>,
}

/// Your attempts, newest first.
#[utoipa::path(get, path = "/v1/me/attempts", tag = "attempts",
    params(ListQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, body = AttemptList, headers(("link" = String, description = "`<…>; rel=\"next\"` while more pages follow"))),
        (status = 400, description = "Malformed or foreign cursor (`invalid-cursor`), or one too old (`cursor-expired`)"),
        (status = 422, description = "`limit` outside 1–200, or cursor and offset together"),
    ))]
async fn list(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Response, ApiError> {
    let limit = pagination::limit(query.limit)?;
    let user = principal.user_id.as_str();
    let after = match &query.cursor {
        None => None,
        Some(raw) => {
            let cursor: Cursor = pagination::decode(raw)?;
            if cursor.user != user {
                return Err(pagination::foreign());
            }
            Some((cursor.at, cursor.id))
        }
    };
    let (items, more) = state.store.attempts_page(user, after, limit).await?;
    let next_cursor = items.last().filter(|_| more).map(|last| {
        pagination::encode(&Cursor {
            user: user.to_string(),
            at: last.started_at,
            id: last.attempt_id,
        })
    });
    let link = next_cursor.as_ref().and_then(|cursor| {
        next_link(
            "/v1/me/attempts",
            &[("limit", limit.to_string()), ("cursor", cursor.clone())],
        )
    });
    Ok((&JsonBody::new(&AttemptList { items, next_cursor }, link)?).into_response())
}
