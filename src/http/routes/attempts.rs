//! Attempts: start, answer, submit (graded by the server), read back.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use cqrs_es::AggregateError;
use podium_domain::attempt::{Attempt, AttemptCommand, AttemptError, StartedAttempt};
use podium_domain::test::TestDefinition;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::catalog::published_definition;
use crate::auth::Principal;
use crate::http::error::{ApiError, Rejection as _};
use crate::http::extract::{ApiJson, ApiPath, OptionalJson, RequestId};
use crate::http::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/tests/{test_id}/attempts", post(start))
        .route("/v1/attempts/{attempt_id}", get(show))
        .route(
            "/v1/attempts/{attempt_id}/answers/{question_id}",
            put(answer),
        )
        .route("/v1/attempts/{attempt_id}/submit", post(submit))
}

/// This resource's operations in the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(start, show, answer, submit))]
pub(super) struct Doc;

#[derive(Default, Deserialize, ToSchema)]
struct StartBody {
    attempt_id: Option<Uuid>,
}

#[derive(Serialize, ToSchema)]
struct Started {
    attempt_id: Uuid,
    test_id: Uuid,
    #[serde(serialize_with = "podium_domain::time::serialize")]
    started_at: DateTime<Utc>,
}

impl From<&StartedAttempt> for Started {
    fn from(attempt: &StartedAttempt) -> Self {
        Self {
            attempt_id: attempt.attempt_id,
            test_id: attempt.test_id,
            started_at: attempt.started_at,
        }
    }
}

/// 201 for a new attempt; 200 with the same body when the caller repeats a
/// start with an attempt id they already used for this test.
#[utoipa::path(post, path = "/v1/tests/{test_id}/attempts", tag = "attempts",
    params(("test_id" = Uuid, Path)), request_body(content = Option<StartBody>),
    security(("bearer" = [])),
    responses(
        (status = 201, body = Started, headers(("location" = String))),
        (status = 200, description = "The same attempt id again: the same body", body = Started),
        (status = 400, description = "Malformed id or JSON"),
        (status = 404, description = "No such test"),
        (status = 409, description = "The test is archived, or the id is taken"),
    ))]
async fn start(
    State(state): State<AppState>,
    principal: Principal,
    request: RequestId,
    ApiPath(test_id): ApiPath<Uuid>,
    OptionalJson(body): OptionalJson<StartBody>,
) -> Result<impl IntoResponse, ApiError> {
    let attempt_id = body.attempt_id.unwrap_or_else(Uuid::new_v4);
    let test = state
        .aggregates
        .tests
        .load(&test_id.to_string())
        .await?
        .published;
    let command = AttemptCommand::StartAttempt {
        attempt_id,
        user_id: principal.user_id.clone(),
        test,
        now: state.clock.now(),
    };
    let id = attempt_id.to_string();
    let attempts = &state.aggregates.attempts;
    let status = match attempts
        .execute(&id, command, request.metadata(&principal))
        .await
    {
        Ok(()) => StatusCode::CREATED,
        Err(AggregateError::UserError(AttemptError::AlreadyStarted))
        | Err(AggregateError::AggregateConflict) => StatusCode::OK,
        Err(other) => return Err(other.into()),
    };
    let attempt = attempts.load(&id).await?;
    let started = attempt
        .started
        .as_ref()
        .filter(|s| s.user_id == principal.user_id && s.test_id == test_id)
        .ok_or_else(|| {
            ApiError::conflict(
                "already-exists",
                "this attempt id is already used for another test or user",
            )
        })?;
    Ok((
        status,
        [(header::LOCATION, format!("/v1/attempts/{attempt_id}"))],
        Json(Started::from(started)),
    ))
}

#[derive(Deserialize, ToSchema)]
struct AnswerBody {
    choice: i64,
}

/// Records (or changes) the answer to one question.
#[utoipa::path(put, path = "/v1/attempts/{attempt_id}/answers/{question_id}", tag = "attempts",
    params(("attempt_id" = Uuid, Path), ("question_id" = String, Path)),
    request_body = AnswerBody,
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Recorded"),
        (status = 400, description = "Malformed id or JSON"),
        (status = 403, description = "Not your attempt"),
        (status = 404, description = "No such attempt"),
        (status = 409, description = "Already submitted, or past the time limit"),
        (status = 422, description = "No such question or choice"),
    ))]
async fn answer(
    State(state): State<AppState>,
    principal: Principal,
    request: RequestId,
    ApiPath((attempt_id, question_id)): ApiPath<(Uuid, String)>,
    ApiJson(body): ApiJson<AnswerBody>,
) -> Result<StatusCode, ApiError> {
    let test = load_for_owner(&state, attempt_id, &principal).await?;
    let command = AttemptCommand::RecordAnswer {
        by: principal.user_id.clone(),
        question_id,
        choice: body.choice,
        test,
        now: state.clock.now(),
    };
    state
        .aggregates
        .attempts
        .execute(
            &attempt_id.to_string(),
            command,
            request.metadata(&principal),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Default, Deserialize, ToSchema)]
struct SubmitBody {
    #[serde(default)]
    answers: BTreeMap<String, i64>,
}

/// The graded result, as the submit endpoint answers it.
#[derive(Serialize, ToSchema)]
struct Submitted {
    attempt_id: Uuid,
    test_id: Uuid,
    #[serde(flatten)]
    grade: GradeView,
}

/// Submits the attempt (with any last answers); the server grades it.
#[utoipa::path(post, path = "/v1/attempts/{attempt_id}/submit", tag = "attempts",
    params(("attempt_id" = Uuid, Path)), request_body(content = Option<SubmitBody>),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Submitted),
        (status = 400, description = "Malformed id or JSON"),
        (status = 403, description = "Not your attempt"),
        (status = 404, description = "No such attempt"),
        (status = 409, description = "Already submitted, or past the time limit"),
        (status = 422, description = "Invalid answers"),
    ))]
async fn submit(
    State(state): State<AppState>,
    principal: Principal,
    request: RequestId,
    ApiPath(attempt_id): ApiPath<Uuid>,
    OptionalJson(body): OptionalJson<SubmitBody>,
) -> Result<Json<Submitted>, ApiError> {
    let test = load_for_owner(&state, attempt_id, &principal).await?;
    let command = AttemptCommand::SubmitAttempt {
        by: principal.user_id.clone(),
        answers: body.answers,
        test,
        now: state.clock.now(),
    };
    let id = attempt_id.to_string();
    let attempts = &state.aggregates.attempts;
    attempts
        .execute(&id, command, request.metadata(&principal))
        .await
        .map_err(|err| match err {
            // Several submits raced and another won: that is "already submitted".
            AggregateError::AggregateConflict => AttemptError::AlreadySubmitted.into_api_error(),
            other => other.into(),
        })?;
    let attempt = attempts.load(&id).await?;
    let view = AttemptView::new(&attempt).ok_or_else(|| ApiError::internal("attempt vanished"))?;
    let grade = view
        .grade
        .map(GradeView::from)
        .ok_or_else(|| ApiError::internal("submitted attempt has no grade"))?;
    Ok(Json(Submitted {
        attempt_id,
        test_id: view.test_id,
        grade,
    }))
}

/// The definition of the test of attempt `attempt_id`, if `principal` owns it.
async fn load_for_owner(
    state: &AppState,
    attempt_id: Uuid,
    principal: &Principal,
) -> Result<TestDefinition, ApiError> {
    let attempt = state
        .aggregates
        .attempts
        .load(&attempt_id.to_string())
        .await?;
    let started = attempt
        .started
        .ok_or_else(|| AttemptError::NotFound.into_api_error())?;
    if started.user_id != principal.user_id {
        return Err(AttemptError::NotOwner.into_api_error());
    }
    let definition = published_definition(state, started.test_id).await?;
    Ok(TestDefinition::clone(&definition))
}

#[derive(Serialize, ToSchema)]
struct AttemptView {
    attempt_id: Uuid,
    test_id: Uuid,
    user_id: String,
    status: &'static str,
    answers: BTreeMap<String, u32>,
    #[serde(serialize_with = "podium_domain::time::serialize")]
    started_at: DateTime<Utc>,
    /// The last instant a submission is accepted, for timed tests.
    #[serde(serialize_with = "podium_domain::time::serialize_option")]
    deadline: Option<DateTime<Utc>>,
    /// Once submitted: the grade's fields (`score`, `max_score`, `correct`,
    /// `duration_ms`, `submitted_at`) sit beside the others.
    #[serde(flatten)]
    #[schema(inline)]
    grade: Option<SubmittedFields>,
}

impl From<SubmittedFields> for GradeView {
    fn from(fields: SubmittedFields) -> Self {
        let SubmittedFields {
            score,
            max_score,
            correct,
            duration_ms,
            submitted_at,
        } = fields;
        Self {
            score,
            max_score,
            correct,
            duration_ms,
            submitted_at,
        }
    }
}

/// The grade's fields, present once the attempt is submitted.
#[derive(Serialize, ToSchema)]
struct SubmittedFields {
    #[schema(required = false)]
    score: u32,
    #[schema(required = false)]
    max_score: u32,
    #[schema(required = false)]
    correct: u32,
    #[schema(required = false)]
    duration_ms: u64,
    #[schema(required = false)]
    #[serde(serialize_with = "podium_domain::time::serialize")]
    submitted_at: DateTime<Utc>,
}

#[derive(Serialize, Clone, Copy, ToSchema)]
struct GradeView {
    score: u32,
    max_score: u32,
    correct: u32,
    duration_ms: u64,
    #[serde(serialize_with = "podium_domain::time::serialize")]
    submitted_at: DateTime<Utc>,
}

impl AttemptView {
    fn new(attempt: &Attempt) -> Option<Self> {
        let started = attempt.started.as_ref()?;
        Some(Self {
            attempt_id: started.attempt_id,
            test_id: started.test_id,
            user_id: started.user_id.to_string(),
            status: if attempt.grade.is_some() {
                "submitted"
            } else {
                "in_progress"
            },
            answers: attempt.answers.clone(),
            started_at: started.started_at,
            deadline: started.deadline(),
            grade: attempt.grade.as_ref().map(|g| SubmittedFields {
                score: g.score,
                max_score: g.max_score,
                correct: g.correct,
                duration_ms: g.duration_ms,
                submitted_at: g.submitted_at,
            }),
        })
    }
}

/// The attempt, for its owner or an admin.
#[utoipa::path(get, path = "/v1/attempts/{attempt_id}", tag = "attempts",
    params(("attempt_id" = Uuid, Path)),
    security(("bearer" = [])),
    responses(
        (status = 200, body = AttemptView),
        (status = 400, description = "Malformed id"),
        (status = 403, description = "Not your attempt"),
        (status = 404, description = "No such attempt"),
    ))]
async fn show(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(attempt_id): ApiPath<Uuid>,
) -> Result<Json<AttemptView>, ApiError> {
    let attempt = state
        .aggregates
        .attempts
        .load(&attempt_id.to_string())
        .await?;
    let view = AttemptView::new(&attempt).ok_or_else(|| AttemptError::NotFound.into_api_error())?;
    if view.user_id != principal.user_id.as_str() && !principal.is_admin() {
        return Err(AttemptError::NotOwner.into_api_error());
    }
    Ok(Json(view))
}
