//! Request metrics: count and time every request by route template, method
//! and status, and count error answers by problem kind.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use crate::http::error::ProblemKind;
use crate::http::AppState;

pub async fn record(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().cloned();
    let method = match *request.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    };
    let started = Instant::now();
    let response = next.run(request).await;
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    let metrics = &state.metrics;
    metrics
        .http_requests
        .with_label_values(&[route, method, response.status().as_str()])
        .inc();
    metrics
        .http_duration
        .with_label_values(&[route, method])
        .observe(started.elapsed().as_secs_f64());
    if let Some(ProblemKind(kind)) = response.extensions().get::<ProblemKind>() {
        metrics.http_errors.with_label_values(&[kind]).inc();
    }
    response
}
