//! `Idempotency-Key` on POST requests: the same key with the same request
//! within 24 hours answers the first response again and records nothing new.
//!
//! The first request claims the key with a pending row before it runs, so a
//! concurrent duplicate gets 409 instead of running twice; the response is
//! stored when it is final. Server errors (5xx) and 429 are not stored, so the
//! client can retry them. A pending row left by a crashed process is taken
//! over after a minute ([`crate::command::idempotency::PENDING_TAKEOVER`]).

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::FutureExt as _;
use sha2::{Digest, Sha256};
use tracing::Instrument as _;

use uuid::Uuid;

use crate::command::idempotency::{Held, IdempotencyStore, StoredAnswer};
use crate::http::error::ApiError;
use crate::http::AppState;

pub const HEADER: &str = "idempotency-key";
/// Set on a response that replays a stored one.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
pub const MAX_KEY_LEN: usize = 255;
/// Stored responses larger than this are not kept (ours are far smaller).
const MAX_STORED_BODY: usize = 1024 * 1024;

/// The caller and key of an idempotent request, for handlers that derive
/// stable ids from it.
#[derive(Debug, Clone)]
pub struct IdempotencyScope {
    principal: String,
    key: String,
}

impl IdempotencyScope {
    /// A UUID that is the same for every retry of this request and `part`.
    pub fn derive_id(&self, part: &str) -> Uuid {
        const NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_5b2e_8a43_4d0e_9b7a_2c51_e3f4_a817);
        let name = format!("{}\u{0}{}\u{0}{}", self.principal, self.key, part);
        Uuid::new_v5(&NAMESPACE, name.as_bytes())
    }
}

pub async fn middleware(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if request.method() != Method::POST {
        return next.run(request).await;
    }
    let Some(key) = request.headers().get(HEADER) else {
        return next.run(request).await;
    };
    let key = match key.to_str() {
        Ok(key) if !key.is_empty() && key.len() <= MAX_KEY_LEN => key.to_string(),
        _ => {
            return ApiError::BadRequest(format!(
                "Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters"
            ))
            .into_response()
        }
    };
    let auth = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    // Unauthenticated requests are refused by the handler; nothing to store.
    let Ok(principal) = state.keys.authenticate_header(auth).await else {
        return next.run(request).await;
    };
    let scope = IdempotencyScope {
        principal: principal.user_id.to_string(),
        key,
    };
    match run_once(&state, scope, request, next).await {
        Ok(response) | Err(response) => response,
    }
}

async fn run_once(
    state: &AppState,
    scope: IdempotencyScope,
    request: Request,
    next: Next,
) -> Result<Response, Response> {
    let (mut parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, state.body_limit)
        .await
        .map_err(|_| {
            ApiError::PayloadTooLarge("the request body is too large".into()).into_response()
        })?;
    let hash = request_hash(&parts, &bytes);
    let store = state.idempotency.as_ref();
    let claimed = store.claim(&scope.principal, &scope.key, &hash).await;
    if !claimed.map_err(|err| ApiError::from(err).into_response())? {
        return Err(replay(store, &scope, &hash).await);
    }
    parts.extensions.insert(scope.clone());
    // The request runs to its end in a task of its own, answer stored, even
    // if the client goes away meanwhile: a retry then gets that answer, not
    // a key left pending (409) and, a minute later, the command run again.
    let request = Request::from_parts(parts, Body::from(bytes));
    let answering = answer_claimed(state.idempotency.clone(), scope.clone(), request, next);
    let running = tokio::spawn(answering.instrument(tracing::Span::current()));
    match running.await {
        Ok(response) => Ok(response),
        Err(err) => {
            // The task was cut short (the runtime is going away).
            release(store, &scope).await;
            Ok(ApiError::internal(format!("the request did not finish: {err}")).into_response())
        }
    }
}

/// Runs the request that claimed `scope`'s key and stores its answer; frees
/// the key instead when the answer is not one to replay (5xx, 429) or cannot
/// be stored, so that a retry runs again.
async fn answer_claimed(
    store: std::sync::Arc<dyn IdempotencyStore>,
    scope: IdempotencyScope,
    request: Request,
    next: Next,
) -> Response {
    let store = store.as_ref();
    let ran = std::panic::AssertUnwindSafe(next.run(request))
        .catch_unwind()
        .await;
    let Ok(response) = ran else {
        // The handler panicked: free the key so that a retry runs again.
        release(store, &scope).await;
        return ApiError::internal("the request handler panicked").into_response();
    };
    let status = response.status();
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        release(store, &scope).await;
        return response;
    }
    let (parts, body) = response.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_STORED_BODY).await else {
        release(store, &scope).await;
        return ApiError::internal("response too large to store").into_response();
    };
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let answer = StoredAnswer {
        status: status.as_u16(),
        content_type,
        body: body.to_vec(),
    };
    if let Err(err) = store.answer(&scope.principal, &scope.key, answer).await {
        tracing::warn!(%err, "cannot store an idempotent response; freeing the key");
        release(store, &scope).await;
    }
    Response::from_parts(parts, Body::from(body))
}

fn request_hash(parts: &axum::http::request::Parts, body: &Bytes) -> Vec<u8> {
    let mut hasher = Sha256::new();
    hasher.update(parts.method.as_str());
    hasher.update([0]);
    hasher.update(parts.uri.to_string());
    hasher.update([0]);
    hasher.update(body);
    hasher.finalize().to_vec()
}

/// The stored answer for a key another request claimed.
async fn replay(store: &dyn IdempotencyStore, scope: &IdempotencyScope, hash: &[u8]) -> Response {
    match store.held(&scope.principal, &scope.key).await {
        Err(err) => ApiError::from(err).into_response(),
        // Deleted between our claim and this read: the first request failed.
        Ok(None) => ApiError::conflict(
            "idempotency-key-in-use",
            "a request with this Idempotency-Key just failed; retry",
        )
        .into_response(),
        Ok(Some(held)) if held.request_hash != hash => ApiError::Unprocessable {
            detail: "this Idempotency-Key was used for a different request".into(),
            errors: Vec::new(),
        }
        .into_response(),
        Ok(Some(Held {
            answer: Some(answer),
            ..
        })) => {
            let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
            let mut response = (status, answer.body).into_response();
            let headers = response.headers_mut();
            let content_type = answer.content_type.as_deref();
            if let Some(value) = content_type.and_then(|c| HeaderValue::from_str(c).ok()) {
                headers.insert(header::CONTENT_TYPE, value);
            }
            headers.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
            response
        }
        Ok(Some(Held { answer: None, .. })) => ApiError::conflict(
            "idempotency-key-in-use",
            "a request with this Idempotency-Key is still being processed",
        )
        .into_response(),
    }
}

/// Frees a claimed key so that a retry runs again.
async fn release(store: &dyn IdempotencyStore, scope: &IdempotencyScope) {
    if let Err(err) = store.release(&scope.principal, &scope.key).await {
        tracing::warn!(%err, "cannot release an idempotency key; it frees itself in a minute");
    }
}
