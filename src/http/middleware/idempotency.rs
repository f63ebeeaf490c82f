//! `Idempotency-Key` on POST requests: the same key with the same request
//! within 24 hours answers the first response again and records nothing new.
//!
//! The first request claims the key with a pending row before it runs, so a
//! concurrent duplicate gets 409 instead of running twice; the response is
//! stored when it is final. Server errors (5xx) and 429 are not stored, so the
//! client can retry them. A pending row left by a crashed process is taken
//! over after [`PENDING_TAKEOVER`].

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::time::Duration;

use uuid::Uuid;

use crate::http::error::ApiError;
use crate::http::AppState;
use crate::query::store::Backend;

pub const HEADER: &str = "idempotency-key";
/// Set on a response that replays a stored one.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
pub const MAX_KEY_LEN: usize = 255;
/// Stored responses larger than this are not kept (ours are far smaller).
const MAX_STORED_BODY: usize = 1024 * 1024;
const RETENTION: &str = "24 hours";
const PENDING_TAKEOVER: &str = "60 seconds";
/// The same, for the embedded mode's keys.
pub const RETENTION_TIME: Duration = Duration::from_secs(24 * 3600);
const PENDING_TAKEOVER_TIME: Duration = Duration::from_secs(60);

/// The caller and key of an idempotent request, for handlers that derive
/// stable ids from it.
#[derive(Debug, Clone)]
pub struct IdempotencyScope {
    principal: String,
    key: String,
}

impl IdempotencyScope {
    fn pair(&self) -> (String, String) {
        (self.principal.clone(), self.key.clone())
    }

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
    let Ok(principal) = state.keys.verify_header(auth) else {
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
    let pool = &state.backend;
    if !claim(pool, &scope, &hash).await.map_err(into_response)? {
        return Err(replay(pool, &scope, &hash).await);
    }
    parts.extensions.insert(scope.clone());
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let status = response.status();
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        release(pool, &scope).await;
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_STORED_BODY).await else {
        release(pool, &scope).await;
        return Ok(ApiError::internal("response too large to store").into_response());
    };
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let stored = match pool {
        Backend::Postgres { pool, .. } => sqlx::query(
            "UPDATE idempotency_keys SET status = $3, content_type = $4, body = $5
              WHERE principal = $1 AND key = $2",
        )
        .bind(&scope.principal)
        .bind(&scope.key)
        .bind(status.as_u16() as i16)
        .bind(content_type)
        .bind(body.as_ref())
        .execute(pool)
        .await
        .map(drop),
        Backend::Embedded(embedded) => {
            let answer = (
                status.as_u16(),
                content_type.map(str::to_string),
                body.to_vec(),
            );
            embedded.keys.answer(&scope.pair(), answer);
            Ok(())
        }
    };
    if let Err(err) = stored {
        tracing::warn!(%err, "cannot store an idempotent response; a retry will run again");
    }
    Ok(Response::from_parts(parts, Body::from(body)))
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

/// Claims the key for this request: true if it was free (or expired, or left
/// pending by a dead process), false if another request holds it.
async fn claim(backend: &Backend, scope: &IdempotencyScope, hash: &[u8]) -> Result<bool, ApiError> {
    let pool = match backend {
        Backend::Postgres { pool, .. } => pool,
        Backend::Embedded(embedded) => {
            return Ok(embedded.keys.claim(
                scope.pair(),
                hash,
                RETENTION_TIME,
                PENDING_TAKEOVER_TIME,
            ))
        }
    };
    let claimed = sqlx::query(&format!(
        "INSERT INTO idempotency_keys (principal, key, request_hash) VALUES ($1, $2, $3)
         ON CONFLICT (principal, key) DO UPDATE
            SET request_hash = EXCLUDED.request_hash, status = NULL, content_type = NULL,
                body = NULL, created_at = now()
          WHERE idempotency_keys.created_at < now() - interval '{RETENTION}'
             OR (idempotency_keys.status IS NULL
                 AND idempotency_keys.created_at < now() - interval '{PENDING_TAKEOVER}')
         RETURNING 1"
    ))
    .bind(&scope.principal)
    .bind(&scope.key)
    .bind(hash)
    .fetch_optional(pool)
    .await?;
    Ok(claimed.is_some())
}

/// The stored answer for a key another request claimed.
async fn replay(backend: &Backend, scope: &IdempotencyScope, hash: &[u8]) -> Response {
    type Row = (Vec<u8>, Option<i16>, Option<String>, Option<Vec<u8>>);
    let row: Result<Option<Row>, sqlx::Error> = match backend {
        Backend::Postgres { pool, .. } => {
            sqlx::query_as(
                "SELECT request_hash, status, content_type, body FROM idempotency_keys
                  WHERE principal = $1 AND key = $2",
            )
            .bind(&scope.principal)
            .bind(&scope.key)
            .fetch_optional(pool)
            .await
        }
        Backend::Embedded(embedded) => Ok(embedded.keys.get(&scope.pair()).map(|held| match held
            .answer
        {
            Some((status, content_type, body)) => (
                held.request_hash,
                Some(status as i16),
                content_type,
                Some(body),
            ),
            None => (held.request_hash, None, None, None),
        })),
    };
    match row {
        Err(err) => into_response(err.into()),
        // Deleted between our claim and this read: the first request failed.
        Ok(None) => ApiError::conflict(
            "idempotency-key-in-use",
            "a request with this Idempotency-Key just failed; retry",
        )
        .into_response(),
        Ok(Some((stored_hash, _, _, _))) if stored_hash != hash => ApiError::Unprocessable {
            detail: "this Idempotency-Key was used for a different request".into(),
            errors: Vec::new(),
        }
        .into_response(),
        Ok(Some((_, Some(status), content_type, body))) => {
            let status = StatusCode::from_u16(status as u16).unwrap_or(StatusCode::OK);
            let mut response = (status, body.unwrap_or_default()).into_response();
            let headers = response.headers_mut();
            if let Some(value) = content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
                headers.insert(header::CONTENT_TYPE, value);
            }
            headers.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
            response
        }
        Ok(Some((_, None, _, _))) => ApiError::conflict(
            "idempotency-key-in-use",
            "a request with this Idempotency-Key is still being processed",
        )
        .into_response(),
    }
}

/// Frees a claimed key so that a retry runs again.
async fn release(backend: &Backend, scope: &IdempotencyScope) {
    let pool = match backend {
        Backend::Postgres { pool, .. } => pool,
        Backend::Embedded(embedded) => return embedded.keys.release(&scope.pair()),
    };
    let result = sqlx::query("DELETE FROM idempotency_keys WHERE principal = $1 AND key = $2")
        .bind(&scope.principal)
        .bind(&scope.key)
        .execute(pool)
        .await;
    if let Err(err) = result {
        tracing::warn!(%err, "cannot release an idempotency key; it frees itself in a minute");
    }
}

/// Deletes keys older than the retention window.
pub async fn purge_expired(backend: &Backend) -> Result<u64, sqlx::Error> {
    let pool = match backend {
        Backend::Postgres { pool, .. } => pool,
        Backend::Embedded(embedded) => return Ok(embedded.keys.purge(RETENTION_TIME)),
    };
    let result = sqlx::query(&format!(
        "DELETE FROM idempotency_keys WHERE created_at < now() - interval '{RETENTION}'"
    ))
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}

fn into_response(err: ApiError) -> Response {
    err.into_response()
}
