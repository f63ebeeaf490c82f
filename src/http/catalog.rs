//! Tests (the exams learners take): publish, archive, read without the key.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use podium_domain::test::{PublishedTest, QuestionDraft, TestCommand, TestDefinition, TestDraft};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::ApiError;
use super::extract::{Admin, ApiJson, ApiPath, RequestId};
use super::AppState;
use crate::auth::Principal;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/tests", post(publish))
        .route("/v1/tests/{test_id}", get(show))
        .route("/v1/tests/{test_id}/archive", post(archive))
}

#[derive(Deserialize)]
struct PublishBody {
    id: Option<Uuid>,
    title: String,
    time_limit_secs: Option<i64>,
    questions: Vec<QuestionDraft>,
}

#[derive(Serialize)]
struct Published {
    id: Uuid,
    max_score: u32,
}

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
#[derive(Serialize)]
struct TestView {
    id: Uuid,
    title: String,
    time_limit_secs: Option<u32>,
    max_score: u32,
    archived: bool,
    questions: Vec<QuestionView>,
}

#[derive(Serialize)]
struct QuestionView {
    id: String,
    prompt: String,
    choices: Vec<String>,
    points: u32,
}

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
