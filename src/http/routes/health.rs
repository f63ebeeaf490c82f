//! `/healthz` (the process is up), `/readyz` (its dependencies answer) and
//! `/metrics` (Prometheus text).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::http::error::ApiError;
use crate::http::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
}

/// This resource's operations in the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(healthz, ready, metrics))]
pub(super) struct Doc;

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    use prometheus::Encoder as _;
    state.metrics.refresh();
    let encoder = prometheus::TextEncoder::new();
    let mut body = Vec::new();
    if let Err(err) = encoder.encode(&state.metrics.registry.gather(), &mut body) {
        return ApiError::internal(err).into_response();
    }
    (
        [(header::CONTENT_TYPE, encoder.format_type().to_string())],
        body,
    )
        .into_response()
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "`{\"status\": \"ok\"}`")))]
pub(super) async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Postgres (and NATS, when configured) answer, and no background role of
/// this instance has halted.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "`{\"status\": \"up\", \"checks\": {\"postgres\": \"up\", \"nats\": \"up\"}}`"),
        (status = 503, description = "A dependency is down or a projection halted; `checks` says which"),
    ))]
pub(super) async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let store = state.store.is_ready().await;
    // Without NATS configured there is nothing to wait for.
    let nats = state.bus.as_ref().map(|bus| bus.is_connected());
    let halted = state.metrics.halted();
    let ready = store && nats != Some(false) && halted.is_empty();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |up: bool| if up { "up" } else { "down" };
    let mut checks = if state.store.in_memory() {
        json!({"store": "embedded"})
    } else {
        json!({"postgres": word(store)})
    };
    if let Some(nats) = nats {
        checks["nats"] = json!(word(nats));
    }
    if !halted.is_empty() {
        let halted: serde_json::Map<String, Value> = halted
            .into_iter()
            .map(|(name, reason)| (name, json!(format!("halted: {reason}"))))
            .collect();
        checks["projections"] = Value::Object(halted);
    }
    (
        status,
        Json(json!({"status": word(ready), "checks": checks})),
    )
}
