//! The one API error type, and its mapping to `application/problem+json`
//! (RFC 9457). Handlers return `Result<_, ApiError>`; domain rejections and
//! store failures are translated here and nowhere else.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use cqrs_es::AggregateError;
use podium_domain::attempt::AttemptError;
use podium_domain::collection::CollectionError;
use podium_domain::notification::NotificationError;
use podium_domain::test::TestError;
use podium_domain::{FieldError, ValidationErrors};
use serde::Serialize;

use crate::auth::AuthError;
use crate::ops::db::StoreError;

pub const PROBLEM_JSON: &str = "application/problem+json";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(#[from] AuthError),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    /// `kind` names the conflict in the problem type, e.g. `already-submitted`.
    #[error("{detail}")]
    Conflict { kind: &'static str, detail: String },
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{detail}")]
    Unprocessable {
        detail: String,
        errors: Vec<FieldError>,
    },
    /// A 400 about a pagination cursor; `kind` names it in the problem type
    /// (`invalid-cursor`, `cursor-expired`).
    #[error("{detail}")]
    BadCursor { kind: &'static str, detail: String },
    /// 429 with `Retry-After: retry_after_secs`.
    #[error("{detail}")]
    TooManyRequests {
        detail: String,
        retry_after_secs: u64,
    },
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(Box<dyn std::error::Error + Send + Sync>),
    /// One error answered to several requests, as a cached or coalesced
    /// load's failure is.
    #[error("{0}")]
    Shared(std::sync::Arc<ApiError>),
}

/// An RFC 9457 problem: every error answer (`application/problem+json`).
#[derive(Serialize, utoipa::ToSchema)]
pub struct Problem<'a> {
    /// `urn:podium:problem:<kind>`, e.g. `urn:podium:problem:already-submitted`.
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: String,
    /// For 422: what is wrong with which field.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    #[schema(schema_with = field_problems)]
    errors: &'a [FieldError],
}

/// The schema of [`Problem`]'s `errors`: `[{field, message}]`, as
/// [`FieldError`] serializes (the domain crate knows nothing of OpenAPI).
fn field_problems() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    let text = || ObjectBuilder::new().schema_type(Type::String);
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .property("field", text())
                .property("message", text())
                .required("field")
                .required("message"),
        )
        .build()
}

/// The most field errors a 422 lists.
pub const MAX_LISTED_ERRORS: usize = 50;

/// What a 503 says: the cause stays in the logs.
const UNAVAILABLE: &str = "the database is unavailable right now; retry in a few seconds";

impl ApiError {
    pub fn conflict(kind: &'static str, detail: impl Into<String>) -> Self {
        Self::Conflict {
            kind,
            detail: detail.into(),
        }
    }

    /// A 422 listing the first [`MAX_LISTED_ERRORS`] of `errors` (the
    /// detail says how many there are in all).
    pub fn invalid(errors: ValidationErrors) -> Self {
        let fields = errors.fields();
        Self::Unprocessable {
            detail: format!("the request has invalid values: {errors}"),
            errors: fields[..fields.len().min(MAX_LISTED_ERRORS)].to_vec(),
        }
    }

    pub fn internal(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Internal(err.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::BadCursor { .. } => StatusCode::BAD_REQUEST,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Shared(inner) => inner.status(),
        }
    }

    /// The last segment of the problem `type` URI.
    fn slug(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "malformed-request",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not-found",
            Self::MethodNotAllowed => "method-not-allowed",
            Self::Conflict { kind, .. } => kind,
            Self::PayloadTooLarge(_) => "payload-too-large",
            Self::UnsupportedMediaType(_) => "unsupported-media-type",
            Self::Unprocessable { .. } => "invalid-values",
            Self::BadCursor { kind, .. } => kind,
            Self::TooManyRequests { .. } => "rate-limited",
            Self::Unavailable(_) => "service-unavailable",
            Self::Internal(_) => "internal-error",
            Self::Shared(inner) => inner.slug(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.to_response()
    }
}

impl ApiError {
    /// The problem+json response; internal causes are logged, not sent.
    pub fn to_response(&self) -> Response {
        if let Self::Shared(inner) = self {
            return inner.to_response();
        }
        let status = self.status();
        let detail = match self {
            // Never leak internals: log the cause chain, answer generically.
            Self::Internal(err) => {
                let mut chain = err.to_string();
                let mut source = err.source();
                while let Some(cause) = source {
                    chain.push_str(": ");
                    chain.push_str(&cause.to_string());
                    source = cause.source();
                }
                tracing::error!(error = chain, "internal error");
                "an unexpected error occurred; it has been logged".to_string()
            }
            // The cause (a driver's message) is logged, not sent.
            Self::Unavailable(cause) => {
                tracing::warn!(cause, "dependency unavailable");
                UNAVAILABLE.to_string()
            }
            other => other.to_string(),
        };
        let errors = match self {
            Self::Unprocessable { errors, .. } => errors.as_slice(),
            _ => &[],
        };
        let problem = Problem {
            kind: format!("urn:podium:problem:{}", self.slug()),
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail,
            errors,
        };
        let body = serde_json::to_vec(&problem).expect("a problem always serializes");
        let mut response = (status, body).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        response.extensions_mut().insert(ProblemKind(self.slug()));
        let headers = response.headers_mut();
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Self::TooManyRequests {
            retry_after_secs, ..
        } = self
        {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
        }
        response
    }
}

/// The kind of problem an error response carries, for metrics.
#[derive(Debug, Clone, Copy)]
pub struct ProblemKind(pub &'static str);

/// How a domain rejection reads to a client.
pub trait Rejection {
    fn into_api_error(self) -> ApiError;
}

impl Rejection for TestError {
    fn into_api_error(self) -> ApiError {
        match self {
            Self::AlreadyExists => ApiError::conflict("already-exists", self.to_string()),
            Self::NotFound => ApiError::NotFound(self.to_string()),
        }
    }
}

impl Rejection for CollectionError {
    fn into_api_error(self) -> ApiError {
        match self {
            Self::AlreadyExists => ApiError::conflict("already-exists", self.to_string()),
            Self::NotFound => ApiError::NotFound(self.to_string()),
            Self::Invalid(errors) => ApiError::invalid(errors),
            Self::Full => ApiError::invalid(ValidationErrors::single("test_id", self.to_string())),
        }
    }
}

impl Rejection for AttemptError {
    fn into_api_error(self) -> ApiError {
        match self {
            Self::TestNotFound | Self::NotFound => ApiError::NotFound(self.to_string()),
            Self::TestArchived => ApiError::conflict("test-archived", self.to_string()),
            Self::AlreadyStarted => ApiError::conflict("already-exists", self.to_string()),
            Self::NotOwner => ApiError::Forbidden(self.to_string()),
            Self::AlreadySubmitted => ApiError::conflict("already-submitted", self.to_string()),
            Self::TimeLimitExceeded { .. } => {
                ApiError::conflict("time-limit-exceeded", self.to_string())
            }
            Self::InvalidAnswers(errors) => ApiError::invalid(errors),
        }
    }
}

impl Rejection for NotificationError {
    fn into_api_error(self) -> ApiError {
        match self {
            Self::AlreadyExists => ApiError::conflict("already-exists", self.to_string()),
            Self::NotFound => ApiError::NotFound(self.to_string()),
            Self::NotRecipient => ApiError::Forbidden(self.to_string()),
        }
    }
}

impl Rejection for std::convert::Infallible {
    fn into_api_error(self) -> ApiError {
        match self {}
    }
}

impl<E: Rejection + std::error::Error> From<AggregateError<E>> for ApiError {
    fn from(err: AggregateError<E>) -> Self {
        match err {
            AggregateError::UserError(rejection) => rejection.into_api_error(),
            AggregateError::AggregateConflict => ApiError::conflict(
                "concurrent-change",
                "another request changed this resource at the same time; retry",
            ),
            AggregateError::DatabaseConnectionError(err) => {
                ApiError::Unavailable(format!("the database is unreachable: {err}"))
            }
            AggregateError::UnexpectedError(err)
                if crate::ops::db::is_unavailable(err.as_ref()) =>
            {
                ApiError::Unavailable(format!("the database is unavailable: {err}"))
            }
            AggregateError::DeserializationError(err) | AggregateError::UnexpectedError(err) => {
                ApiError::Internal(err)
            }
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        StoreError::from(err).into()
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(_) => ApiError::Unavailable(err.to_string()),
            StoreError::Failed(err) => ApiError::Internal(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_503_names_no_driver_internals() {
        let err = ApiError::from(sqlx::Error::PoolTimedOut);
        let response = err.to_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(problem["type"], "urn:podium:problem:service-unavailable");
        let detail = problem["detail"].as_str().unwrap();
        assert_eq!(detail, UNAVAILABLE);
        assert!(!detail.contains("pool"), "{detail}");
    }
}
