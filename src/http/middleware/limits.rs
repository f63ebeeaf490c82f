//! The rate-limit layer: every request outside the operations endpoints
//! spends from its client IP's budget and, when it carries a valid token,
//! from its user's command or query budget (see [`crate::ratelimit`]).
//! Answers carry `RateLimit-Limit`, `RateLimit-Remaining` and
//! `RateLimit-Reset` of the tightest budget; refusals are 429 with
//! `Retry-After`.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::auth::Principal;
use crate::http::error::ApiError;
use crate::http::AppState;
use crate::ratelimit::{client_ip, Decision};

/// Paths that are never limited: probes, scrapes and documents.
pub fn is_operational(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics" | "/openapi.json")
}

pub async fn middleware(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(limiter) = state.limiter.clone() else {
        return next.run(request).await;
    };
    if is_operational(request.uri().path()) || request.method() == Method::OPTIONS {
        return next.run(request).await;
    }
    let mut decisions = Vec::with_capacity(2);
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    if let Some(peer) = peer {
        let forwarded = request
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        let ip = client_ip(peer, forwarded, &state.trusted_proxies);
        decisions.push(limiter.check(&limiter.budgets.ip, &ip.to_string()).await);
    }
    let token = bearer_or_stream_token(&request);
    if let Some(principal) = caller(&state, token).await {
        let budget = if matches!(*request.method(), Method::GET | Method::HEAD) {
            &limiter.budgets.user_queries
        } else {
            &limiter.budgets.user_commands
        };
        decisions.push(limiter.check(budget, principal.user_id.as_str()).await);
        // Handlers take the caller from here instead of checking the token again.
        request.extensions_mut().insert(principal);
    }
    let Some(tightest) = decisions
        .iter()
        .min_by_key(|d| (d.allowed, d.remaining))
        .copied()
    else {
        return next.run(request).await;
    };
    let mut response = if tightest.allowed {
        next.run(request).await
    } else {
        state
            .metrics
            .rate_limited
            .with_label_values(&[tightest.budget])
            .inc();
        ApiError::TooManyRequests {
            detail: format!(
                "the {} budget of {} requests is spent; try again in {} s",
                tightest.budget, tightest.limit, tightest.reset_secs
            ),
            retry_after_secs: tightest.reset_secs,
        }
        .into_response()
    };
    set_headers(response.headers_mut(), &tightest);
    response
}

/// The request's token: from `Authorization` (the whole header, `Bearer`
/// and all), or `?access_token=` for streams, the only routes that take it.
fn bearer_or_stream_token(request: &Request) -> Option<Presented> {
    if let Some(value) = request.headers().get(header::AUTHORIZATION) {
        return Some(Presented::Header(value.to_str().ok()?.to_string()));
    }
    if !request.uri().path().ends_with("/stream") {
        return None;
    }
    let query = request.uri().query()?;
    let token = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("access_token="))?;
    Some(Presented::Query(token.to_string()))
}

/// A token as the request presents it (owned: the request's body is not
/// `Sync`, so the request cannot be borrowed across the check).
enum Presented {
    /// The `Authorization` header's value.
    Header(String),
    /// `?access_token=`.
    Query(String),
}

/// The caller that `token` proves, if any.
async fn caller(state: &AppState, token: Option<Presented>) -> Option<Principal> {
    match token? {
        Presented::Header(header) => state.keys.authenticate_header(Some(&header)).await.ok(),
        Presented::Query(token) => state.keys.authenticate(&token).await.ok(),
    }
}

fn set_headers(headers: &mut HeaderMap, decision: &Decision) {
    headers.insert("ratelimit-limit", HeaderValue::from(decision.limit));
    headers.insert("ratelimit-remaining", HeaderValue::from(decision.remaining));
    headers.insert("ratelimit-reset", HeaderValue::from(decision.reset_secs));
}
