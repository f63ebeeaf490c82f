//! Tests (the exams learners take): publish, archive, read without the key.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use podium_domain::test::{PublishedTest, QuestionDraft, TestCommand, TestDefinition, TestDraft};
use podium_projections::catalog::TestSummary;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::ToSchema;

use uuid::Uuid;

use crate::auth::Principal;
use crate::http::error::ApiError;
use crate::http::extract::{Admin, ApiJson, ApiPath, RequestId};
use crate::http::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/tests", post(publish).get(list))
        .route("/v1/tests/{test_id}", get(show))
        .route("/v1/tests/{test_id}/archive", post(archive))
}

/// This resource's operations in the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(list, publish, show, archive))]
pub(super) struct Doc;

#[derive(Deserialize, ToSchema)]
struct PublishBody {
    /// Chosen by the client for safe retries; a new one otherwise.
    id: Option<Uuid>,
    /// 1–200 characters.
    title: String,
    /// Up to a week; no limit when absent.
    time_limit_secs: Option<i64>,
    /// 1–500 questions with unique ids.
    #[schema(value_type = Vec<QuestionBody>)]
    questions: Vec<QuestionDraft>,
}

/// A question as published, with its answer key.
#[derive(ToSchema)]
#[allow(dead_code)]
struct QuestionBody {
    id: String,
    prompt: String,
    /// 2–20 choices.
    choices: Vec<String>,
    /// The index of the right choice.
    answer: i64,
    /// 0–1000.
    points: i64,
}

#[derive(Serialize, ToSchema)]
struct Published {
    id: Uuid,
    max_score: u32,
}

/// Publishes a test (admin).
#[utoipa::path(post, path = "/v1/tests", tag = "tests", request_body = PublishBody,
    security(("bearer" = [])),
    responses(
        (status = 201, body = Published, headers(("location" = String, description = "The test's URL"))),
        (status = 400, description = "Malformed JSON"),
        (status = 403, description = "Not an admin"),
        (status = 409, description = "A test with this id exists"),
        (status = 413, description = "Body too large"),
        (status = 415, description = "Not JSON"),
        (status = 422, description = "Invalid test"),
    ))]
async fn publish(
    State(state): State<AppState>,
    Admin(admin): Admin,
    request: RequestId,
    ApiJson(body): ApiJson<PublishBody>,
) -> Result<impl IntoResponse, ApiError> {
    let definition = TestDefinition::parse(TestDraft {
        title: body.title,
        time_limit_secs: body.time_limit_secs,
        questions: body.questions,
    })
    .map_err(ApiError::invalid)?;
    let test_id = body.id.unwrap_or_else(Uuid::new_v4);
    let max_score = definition.max_score();
    let command = TestCommand::PublishTest {
        test_id,
        definition,
    };
    state
        .aggregates
        .tests
        .execute(&test_id.to_string(), command, request.metadata(&admin))
        .await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/v1/tests/{test_id}"))],
        Json(Published {
            id: test_id,
            max_score,
        }),
    ))
}

/// Archives a test (admin): no new attempts; idempotent.
#[utoipa::path(post, path = "/v1/tests/{test_id}/archive", tag = "tests",
    params(("test_id" = Uuid, Path)),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Archived"),
        (status = 400, description = "Malformed id"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such test"),
    ))]
async fn archive(
    State(state): State<AppState>,
    Admin(admin): Admin,
    request: RequestId,
    ApiPath(test_id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    state
        .aggregates
        .tests
        .execute(
            &test_id.to_string(),
            TestCommand::ArchiveTest,
            request.metadata(&admin),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A test as learners see it: everything but the answer key.
#[derive(Serialize, ToSchema)]
struct TestView {
    id: Uuid,
    title: String,
    time_limit_secs: Option<u32>,
    max_score: u32,
    archived: bool,
    questions: Vec<QuestionView>,
}

#[derive(Serialize, ToSchema)]
struct QuestionView {
    id: String,
    prompt: String,
    choices: Vec<String>,
    points: u32,
}

#[derive(Serialize, ToSchema)]
struct TestList {
    items: Vec<TestSummary>,
}

/// Every published test, newest first (archived ones say so).
#[utoipa::path(get, path = "/v1/tests", tag = "tests",
    security(("bearer" = [])),
    responses(
        (status = 200, body = TestList),
    ))]
async fn list(State(state): State<AppState>, _: Principal) -> Result<Json<TestList>, ApiError> {
    Ok(Json(TestList {
        items: state.store.tests().await?,
    }))
}

/// A test without its answer key.
#[utoipa::path(get, path = "/v1/tests/{test_id}", tag = "tests",
    params(("test_id" = Uuid, Path)),
    security(("bearer" = [])),
    responses(
        (status = 200, body = TestView),
        (status = 400, description = "Malformed id"),
        (status = 404, description = "No such test"),
    ))]
async fn show(
    State(state): State<AppState>,
    _: Principal,
    ApiPath(test_id): ApiPath<Uuid>,
) -> Result<Json<TestView>, ApiError> {
    let test = load_published(&state, test_id).await?;
    let definition = test.definition;
    Ok(Json(TestView {
        id: test.test_id,
        max_score: definition.max_score(),
        title: definition.title,
        time_limit_secs: definition.time_limit_secs,
        archived: test.archived,
        questions: definition
            .questions
            .into_iter()
            .map(|q| QuestionView {
                id: q.id,
                prompt: q.prompt,
                choices: q.choices,
                points: q.points,
            })
            .collect(),
    }))
}

/// The definition of published test `test_id`, or 404. A definition never
/// changes once published and a test is never unpublished, so it is kept in
/// memory after the first load: answers and submissions skip a read of the
/// test's events. (Whether it is archived does change: `start` and `show`
/// read the aggregate.)
pub(super) async fn published_definition(
    state: &AppState,
    test_id: Uuid,
) -> Result<Arc<TestDefinition>, ApiError> {
    state
        .definitions
        .try_get_with(test_id, async {
            load_published(state, test_id)
                .await
                .map(|test| Arc::new(test.definition))
        })
        .await
        .map_err(ApiError::Shared)
}

/// The published test `test_id`, or 404.
pub(super) async fn load_published(
    state: &AppState,
    test_id: Uuid,
) -> Result<PublishedTest, ApiError> {
    state
        .aggregates
        .tests
        .load(&test_id.to_string())
        .await?
        .published
        .ok_or_else(|| ApiError::NotFound("no such test".into()))
}
