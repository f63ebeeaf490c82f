//! Extractors whose rejections are problem+json: JSON bodies, path
//! parameters, the authenticated caller, and the request's identity for
//! event metadata.

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use podium_domain::EventMetadata;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::AppState;
use crate::auth::Principal;

/// A JSON body: 415 without a JSON content type, 400 when it is not JSON,
/// 422 when its values do not fit, 413 when it is too large.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::JsonDataError(err) => ApiError::Unprocessable {
            detail: format!(
                "the body does not fit the expected shape: {}",
                err.body_text()
            ),
            errors: Vec::new(),
        },
        JsonRejection::JsonSyntaxError(err) => {
            ApiError::BadRequest(format!("the body is not valid JSON: {}", err.body_text()))
        }
        JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType(
            "send the body as `Content-Type: application/json`".into(),
        ),
        JsonRejection::BytesRejection(err) if err.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::PayloadTooLarge("the request body is too large".into())
        }
        other => ApiError::BadRequest(other.body_text()),
    }
}

/// A JSON body that may be left out entirely: no body and no content type
/// give `T::default()`; anything else is read as [`ApiJson`].
pub struct OptionalJson<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let has_content_type = req.headers().contains_key(header::CONTENT_TYPE);
        let empty_length = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_none_or(|len| len == "0");
        if !has_content_type && empty_length {
            let bytes = axum::body::Bytes::from_request(req, state)
                .await
                .map_err(|err| ApiError::BadRequest(err.body_text()))?;
            if bytes.is_empty() {
                return Ok(Self(T::default()));
            }
            return Err(ApiError::UnsupportedMediaType(
                "send the body as `Content-Type: application/json`".into(),
            ));
        }
        ApiJson::from_request(req, state)
            .await
            .map(|ApiJson(v)| Self(v))
    }
}

/// Query parameters: values that do not fit are a 422.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::Unprocessable {
                detail: format!("invalid query parameters: {}", rejection.body_text()),
                errors: Vec::new(),
            }),
        }
    }
}

/// Path parameters: a malformed one (say, a bad UUID) is a 400.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(PathRejection::FailedToDeserializePathParams(err)) => Err(ApiError::BadRequest(
                format!("invalid path parameter: {}", err.body_text()),
            )),
            Err(other) => Err(ApiError::BadRequest(other.body_text())),
        }
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // The rate-limit layer has checked the token already.
        if let Some(principal) = parts.extensions.get::<Principal>() {
            return Ok(principal.clone());
        }
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .map(|value| value.to_str().unwrap_or_default());
        Ok(state.keys.authenticate_header(header).await?)
    }
}

/// A caller with the admin role; others get 403.
pub struct Admin(pub Principal);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let principal = Principal::from_request_parts(parts, state).await?;
        if !principal.is_admin() {
            return Err(ApiError::Forbidden("this needs the admin role".into()));
        }
        Ok(Self(principal))
    }
}

/// The request's id, as set by the request-id layer.
pub struct RequestId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let id = parts
            .headers
            .get(super::REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        Ok(Self(id.to_string()))
    }
}

impl RequestId {
    /// Metadata for events caused by `principal` in this request, now.
    pub fn metadata(&self, principal: &Principal) -> EventMetadata {
        EventMetadata {
            actor: principal.user_id.to_string(),
            request_id: self.0.clone(),
            recorded_at: crate::clock::now(),
        }
    }
}
