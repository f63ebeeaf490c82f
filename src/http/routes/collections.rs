//! Collections (cross-test leaderboards): create, add tests, read.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use podium_domain::collection::{self, CollectionCommand, CreatedCollection};
use podium_domain::ValidationErrors;
use podium_projections::catalog::CollectionSummary;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::catalog::load_published;
use crate::auth::Principal;
use crate::http::error::ApiError;
use crate::http::extract::{Admin, ApiJson, ApiPath, RequestId};
use crate::http::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/collections", post(create).get(list))
        .route("/v1/collections/{collection_id}", get(show))
        .route(
            "/v1/collections/{collection_id}/tests/{test_id}",
            put(add_test),
        )
}

/// This resource's operations in the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(create, list, show, add_test))]
pub(super) struct Doc;

#[derive(Deserialize, ToSchema)]
struct CreateBody {
    /// Chosen by the client for safe retries; a new one otherwise.
    id: Option<Uuid>,
    /// 1–200 characters.
    title: String,
    /// 1–100 published tests, none twice.
    test_ids: Vec<Uuid>,
}

#[derive(Serialize, ToSchema)]
struct Created {
    id: Uuid,
}

/// A collection: its title and tests, in the order they were added.
#[derive(Serialize, ToSchema)]
struct CollectionView {
    id: Uuid,
    title: String,
    test_ids: Vec<Uuid>,
}

/// Creates a collection of published tests (admin).
#[utoipa::path(post, path = "/v1/collections", tag = "collections", request_body = CreateBody,
    security(("bearer" = [])),
    responses(
        (status = 201, body = Created, headers(("location" = String, description = "The collection's URL"))),
        (status = 400, description = "Malformed JSON"),
        (status = 403, description = "Not an admin"),
        (status = 409, description = "A collection with this id exists"),
        (status = 413, description = "Body too large"),
        (status = 415, description = "Not JSON"),
        (status = 422, description = "A blank or long title, no tests or more than 100, a test twice, or a test that is not published"),
    ))]
async fn create(
    State(state): State<AppState>,
    Admin(admin): Admin,
    request: RequestId,
    ApiJson(body): ApiJson<CreateBody>,
) -> Result<impl IntoResponse, ApiError> {
    collection::validate(&body.title, &body.test_ids).map_err(ApiError::invalid)?;
    let mut unpublished = ValidationErrors::new();
    for (i, test_id) in body.test_ids.iter().enumerate() {
        match load_published(&state, *test_id).await {
            Ok(_) => {}
            Err(ApiError::NotFound(_)) => {
                unpublished.add(format!("test_ids[{i}]"), "is not a published test");
            }
            Err(err) => return Err(err),
        }
    }
    unpublished.into_result(()).map_err(ApiError::invalid)?;
    let collection_id = body.id.unwrap_or_else(Uuid::new_v4);
    let command = CollectionCommand::CreateCollection {
        collection_id,
        title: body.title,
        test_ids: body.test_ids,
    };
    state
        .aggregates
        .collections
        .execute(
            &collection_id.to_string(),
            command,
            request.metadata(&admin),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/v1/collections/{collection_id}"))],
        Json(Created { id: collection_id }),
    ))
}

/// Adds a published test to a collection (admin): everyone's results on it
/// count at once. Adding a test the collection has changes nothing.
#[utoipa::path(put, path = "/v1/collections/{collection_id}/tests/{test_id}", tag = "collections",
    params(("collection_id" = Uuid, Path), ("test_id" = Uuid, Path)),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "The collection holds the test"),
        (status = 400, description = "Malformed id"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such collection, or no such published test"),
        (status = 422, description = "The collection holds 100 tests already"),
    ))]
async fn add_test(
    State(state): State<AppState>,
    Admin(admin): Admin,
    request: RequestId,
    ApiPath((collection_id, test_id)): ApiPath<(Uuid, Uuid)>,
) -> Result<StatusCode, ApiError> {
    load_published(&state, test_id).await?;
    state
        .aggregates
        .collections
        .execute(
            &collection_id.to_string(),
            CollectionCommand::AddTest { test_id },
            request.metadata(&admin),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, ToSchema)]
struct CollectionList {
    /// Newest first.
    items: Vec<CollectionSummary>,
}

/// Every collection, newest first (as the catalog lists them: a collection
/// just created may take a moment to appear).
#[utoipa::path(get, path = "/v1/collections", tag = "collections",
    security(("bearer" = [])),
    responses(
        (status = 200, body = CollectionList),
    ))]
async fn list(
    State(state): State<AppState>,
    _: Principal,
) -> Result<Json<CollectionList>, ApiError> {
    Ok(Json(CollectionList {
        items: state.store.collections().await?,
    }))
}

/// A collection's title and tests.
#[utoipa::path(get, path = "/v1/collections/{collection_id}", tag = "collections",
    params(("collection_id" = Uuid, Path)),
    security(("bearer" = [])),
    responses(
        (status = 200, body = CollectionView),
        (status = 400, description = "Malformed id"),
        (status = 404, description = "No such collection"),
    ))]
async fn show(
    State(state): State<AppState>,
    _: Principal,
    ApiPath(collection_id): ApiPath<Uuid>,
) -> Result<Json<CollectionView>, ApiError> {
    let CreatedCollection {
        collection_id,
        title,
        test_ids,
    } = state
        .aggregates
        .collections
        .load(&collection_id.to_string())
        .await?
        .created
        .ok_or_else(|| ApiError::NotFound("no such collection".into()))?;
    Ok(Json(CollectionView {
        id: collection_id,
        title,
        test_ids,
    }))
}
