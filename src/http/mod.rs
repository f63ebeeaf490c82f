//! The HTTP API: one router per resource, merged here, with the layers every
//! request passes through (request ids, tracing, body limit, idempotency,
//! panics turned into problem+json). Resources live in `routes`,
//! the layers in [`middleware`]; storage errors become problem+json here and
//! only here ([`error`]). May use `auth`, `query`, `command`, `ratelimit`,
//! `ops`, `config` and `clock`.

mod cached;
pub mod error;
pub mod extract;
pub mod middleware;
mod openapi;
mod pagination;
mod routes;
pub mod server;
pub mod sse;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use std::net::IpAddr;
use std::time::Duration;

use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::response::IntoResponse;
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use tokio_util::sync::CancellationToken;

use crate::auth::JwtKeys;
use crate::command::idempotency::IdempotencyStore;
use crate::command::Aggregates;
use crate::config::QuerySettings;
use crate::ops::metrics::Metrics;
use crate::query::changes::ChangeHub;
use crate::query::store::ReadStore;
use crate::ratelimit::RateLimiter;
use error::ApiError;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What every handler can reach: one shared [`AppParts`]. Middleware and
/// extractors clone the state for every request, so it is one `Arc` (cloning
/// the parts themselves, dozens of `Arc`s, cost a third of a cached query).
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

impl AppState {
    pub fn new(parts: AppParts) -> Self {
        Self(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppParts;

    fn deref(&self) -> &AppParts {
        &self.0
    }
}

pub struct AppParts {
    /// Where the read models are read.
    pub store: Arc<dyn ReadStore>,
    /// The projection engine as operators see it; `None` in the embedded
    /// mode (its read models live in memory and are rebuilt at every start).
    pub operations: Option<Arc<dyn crate::ops::operator::Operator>>,
    /// Where idempotency keys and their answers are kept.
    pub idempotency: Arc<dyn IdempotencyStore>,
    pub aggregates: Arc<Aggregates>,
    pub keys: Arc<JwtKeys>,
    /// Largest accepted request body, in bytes.
    pub body_limit: usize,
    /// The NATS connection, when configured.
    pub bus: Option<podium_nats::EventBus>,
    /// Change notifications, routed to this instance's SSE streams.
    pub hub: Arc<ChangeHub>,
    pub cache: cached::Cache,
    pub metrics: Metrics,
    /// Open SSE streams per user.
    pub streams: Arc<sse::StreamSlots>,
    pub query: Arc<QuerySettings>,
    /// Cancelled when the server shuts down: streams end cleanly.
    pub shutdown: CancellationToken,
    /// Shared rate limits; `None` when off.
    pub limiter: Option<Arc<RateLimiter>>,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Arc<Vec<IpAddr>>,
    /// Browser origins allowed to call the API.
    pub cors_origins: Arc<Vec<HeaderValue>>,
    /// Whether requests are counted and timed in metrics.
    pub http_metrics: bool,
    /// Email settings, webhook endpoints and their deliveries.
    pub deliveries: Arc<crate::delivery::Deliveries>,
    /// Published tests' definitions, which never change.
    pub definitions: moka::future::Cache<uuid::Uuid, Arc<podium_domain::test::TestDefinition>>,
    /// What commands and leaderboard windows take as now.
    pub clock: crate::clock::Clock,
    /// Leaderboards as of past instants, folded on demand.
    pub as_of: Arc<crate::query::as_of::AsOfBoards>,
}

pub fn router(state: AppState) -> Router {
    let body_limit = state.body_limit;
    let cors = cors(&state.cors_origins);
    Router::new()
        .merge(routes::router())
        .merge(openapi::router())
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::idempotency::middleware,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::limits::middleware,
        ))
        .layer(tower::util::option_layer(state.http_metrics.then(|| {
            axum::middleware::from_fn_with_state(state.clone(), middleware::observe::record)
        })))
        .layer(DefaultBodyLimit::max(body_limit))
        // Never for event streams: the default predicate leaves them alone.
        .layer(CompressionLayer::new())
        .layer(cors)
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("the request handler panicked").into_response()
        }))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(axum::middleware::map_request(refuse_odd_request_ids))
        .with_state(state)
}

/// The span of a request: its method and path, never its query (where
/// `?access_token=` travels).
fn request_span<B>(request: &axum::http::Request<B>) -> tracing::Span {
    tracing::debug_span!(
        "request",
        method = %request.method(),
        path = request.uri().path(),
        version = ?request.version(),
    )
}

/// The longest client `X-Request-Id` kept (it goes into every event's
/// metadata and every log line).
const MAX_REQUEST_ID_LEN: usize = 128;

/// Drops a client's `X-Request-Id` that is too long or holds anything but
/// letters, digits and `-_.:`: the request then gets a fresh UUID.
async fn refuse_odd_request_ids(mut request: axum::extract::Request) -> axum::extract::Request {
    let odd = request.headers().get(REQUEST_ID).is_some_and(|id| {
        let id = id.as_bytes();
        id.is_empty()
            || id.len() > MAX_REQUEST_ID_LEN
            || !id
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
    });
    if odd {
        request.headers_mut().remove(REQUEST_ID);
    }
    request
}

/// CORS for browser clients on `origins`; with none, no origin is granted.
fn cors(origins: &[HeaderValue]) -> CorsLayer {
    const EXPOSED: [&str; 8] = [
        "ratelimit-limit",
        "ratelimit-remaining",
        "ratelimit-reset",
        "retry-after",
        "link",
        "location",
        "x-request-id",
        "idempotent-replayed",
    ];
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins.iter().cloned()))
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("last-event-id"),
            HeaderName::from_static("idempotency-key"),
        ])
        .expose_headers(EXPOSED.map(HeaderName::from_static))
        .max_age(Duration::from_secs(600))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Log output, kept for the test to read.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_request_span_names_the_path_never_the_query_token() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let request = axum::http::Request::get(
                "/v1/me/notifications/stream?access_token=eyJ.secret.token",
            )
            .body(())
            .unwrap();
            let span = request_span(&request);
            span.in_scope(|| tracing::debug!("handled"));
        });
        let logged = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(logged.contains("/v1/me/notifications/stream"), "{logged}");
        assert!(!logged.contains("secret"), "{logged}");
    }
}
