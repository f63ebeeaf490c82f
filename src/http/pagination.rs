//! Pagination: `limit` checking, opaque cursors, and `Link: rel="next"`.
//!
//! A cursor is base64url of a small JSON document naming the listing it
//! belongs to, so a cursor from another listing (another test, another user,
//! another endpoint) is refused with 400 rather than misread.

use axum::http::HeaderValue;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use podium_domain::ValidationErrors;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::error::ApiError;

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 200;

/// `limit` or its default; 422 outside 1–200.
pub fn limit(raw: Option<i64>) -> Result<i64, ApiError> {
    match raw {
        None => Ok(DEFAULT_LIMIT),
        Some(limit) if (1..=MAX_LIMIT).contains(&limit) => Ok(limit),
        Some(_) => Err(invalid(
            "limit",
            format!("must be between 1 and {MAX_LIMIT}"),
        )),
    }
}

/// 422 naming `field`.
pub fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    let mut errors = ValidationErrors::new();
    errors.add(field, message.into());
    ApiError::invalid(errors)
}

/// The opaque form of `cursor`.
pub fn encode<C: Serialize>(cursor: &C) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(cursor).expect("cursors always serialize"))
}

/// Reads a cursor made by [`encode`]; 400 if it is not one.
pub fn decode<C: DeserializeOwned>(raw: &str) -> Result<C, ApiError> {
    let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| malformed())?;
    serde_json::from_slice(&bytes).map_err(|_| malformed())
}

/// 400 for a cursor no page made.
pub fn malformed() -> ApiError {
    ApiError::BadCursor {
        kind: "invalid-cursor",
        detail: "the cursor is malformed; use the next_cursor of a previous page".into(),
    }
}

/// 400 for a well-formed cursor of another listing.
pub fn foreign() -> ApiError {
    ApiError::BadCursor {
        kind: "invalid-cursor",
        detail: "the cursor belongs to another listing".into(),
    }
}

/// `Link: <path?query>; rel="next"`; `query` holds URL-safe values only
/// (numbers, booleans, cursors).
pub fn next_link(path: &str, query: &[(&str, String)]) -> Option<HeaderValue> {
    let query: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    HeaderValue::from_str(&format!("<{path}?{}>; rel=\"next\"", query.join("&"))).ok()
}
