//! Delivery channels: each user's email settings, and the webhook endpoints
//! admins register, with their delivery logs.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use podium_domain::ValidationErrors;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::Principal;
use crate::delivery::{
    Channel, DeliveryFilter, DeliveryView, EmailSettings, Endpoint, Retry, EMAIL_KINDS,
    WEBHOOK_EVENTS,
};
use crate::http::error::ApiError;
use crate::http::extract::{Admin, ApiJson, ApiPath, ApiQuery};
use crate::http::pagination::{self, next_link};
use crate::http::AppState;

/// The longest address kept (RFC 5321's limit on a path).
const MAX_EMAIL_LEN: usize = 254;
/// The longest endpoint URL.
const MAX_URL_LEN: usize = 2_048;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/me/delivery", get(settings).put(put_settings))
        .route("/v1/webhooks", get(endpoints).post(create_endpoint))
        .route("/v1/webhooks/{id}", delete(delete_endpoint))
        .route("/v1/webhooks/{id}/deliveries", get(deliveries))
        .route("/v1/admin/deliveries", get(all_deliveries))
        .route("/v1/admin/deliveries/{id}/retry", post(retry_delivery))
}

/// This resource's operations in the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    settings,
    put_settings,
    endpoints,
    create_endpoint,
    delete_endpoint,
    deliveries,
    all_deliveries,
    retry_delivery
))]
pub(super) struct Doc;

/// Your email settings: where your emails go, and which notification kinds
/// are emailed (by default `personal_best`, `rank_overtaken`,
/// `period_podium` and `announcement`; no address until you set one).
#[utoipa::path(get, path = "/v1/me/delivery", tag = "delivery",
    security(("bearer" = [])),
    responses(
        (status = 200, body = EmailSettings),
        (status = 401, description = "No valid token"),
    ))]
async fn settings(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<EmailSettings>, ApiError> {
    let user = principal.user_id.as_str();
    let mut found = state.deliveries.store.email_settings(&[user]).await?;
    Ok(Json(found.remove(user).unwrap_or_default()))
}

#[derive(Deserialize, ToSchema)]
struct SettingsBody {
    /// Your address; `null` stops all email.
    email: Option<String>,
    /// The kinds to email; the defaults when absent.
    email_kinds: Option<Vec<String>>,
}

/// `values` in their order, each once, every one of `known`; an unknown one
/// is an error naming `field[i]`.
fn chosen(
    field: &str,
    values: Vec<String>,
    known: &[&str],
    errors: &mut ValidationErrors,
) -> Vec<String> {
    let mut chosen: Vec<String> = Vec::with_capacity(values.len());
    for (i, value) in values.into_iter().enumerate() {
        if !known.contains(&value.as_str()) {
            errors.add(
                format!("{field}[{i}]"),
                format!("must be one of {}", known.join(", ")),
            );
        } else if !chosen.contains(&value) {
            chosen.push(value);
        }
    }
    chosen
}

impl SettingsBody {
    fn parse(self) -> Result<EmailSettings, ValidationErrors> {
        let mut errors = ValidationErrors::new();
        let email = self.email.map(|raw| raw.trim().to_string());
        if let Some(address) = &email {
            if address.len() > MAX_EMAIL_LEN {
                errors.add(
                    "email",
                    format!("must be at most {MAX_EMAIL_LEN} characters"),
                );
            } else if let Err(err) = address.parse::<lettre::Address>() {
                errors.add("email", format!("is not an email address: {err}"));
            }
        }
        let email_kinds = match self.email_kinds {
            None => EmailSettings::default().email_kinds,
            Some(kinds) => chosen("email_kinds", kinds, &EMAIL_KINDS, &mut errors),
        };
        errors.into_result(EmailSettings { email, email_kinds })
    }
}

/// Sets your email settings (the whole of them).
#[utoipa::path(put, path = "/v1/me/delivery", tag = "delivery",
    request_body = SettingsBody,
    security(("bearer" = [])),
    responses(
        (status = 200, body = EmailSettings, description = "The settings stored"),
        (status = 400, description = "Malformed JSON"),
        (status = 401, description = "No valid token"),
        (status = 415, description = "Not JSON"),
        (status = 422, description = "A malformed address or an unknown kind"),
    ))]
async fn put_settings(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(body): ApiJson<SettingsBody>,
) -> Result<Json<EmailSettings>, ApiError> {
    let settings = body.parse().map_err(ApiError::invalid)?;
    state
        .deliveries
        .store
        .put_email_settings(principal.user_id.as_str(), &settings)
        .await?;
    Ok(Json(settings))
}

#[derive(Deserialize, ToSchema)]
struct EndpointBody {
    /// Where events are posted: `http://` or `https://`.
    url: String,
    /// The event types it gets (`attempt.submitted`, `notification.created`,
    /// `test.published`); all when absent.
    events: Option<Vec<String>>,
}

impl EndpointBody {
    fn parse(self) -> Result<(String, Vec<String>), ValidationErrors> {
        let mut errors = ValidationErrors::new();
        let url = self.url.trim().to_string();
        match reqwest::Url::parse(&url) {
            _ if url.len() > MAX_URL_LEN => {
                errors.add("url", format!("must be at most {MAX_URL_LEN} characters"))
            }
            Ok(parsed)
                if matches!(parsed.scheme(), "http" | "https") && parsed.host().is_some() => {}
            Ok(_) => errors.add("url", "must be an http:// or https:// URL with a host"),
            Err(err) => errors.add("url", format!("is not a URL: {err}")),
        }
        let events = match self.events {
            // Every type, including those added later.
            None => Vec::new(),
            Some(events) if events.is_empty() => {
                errors.add(
                    "events",
                    "must name at least one event type (leave it out for all)",
                );
                events
            }
            Some(events) => chosen("events", events, &WEBHOOK_EVENTS, &mut errors),
        };
        errors.into_result((url, events))
    }
}

#[derive(Serialize, ToSchema)]
struct CreatedEndpoint {
    id: Uuid,
    url: String,
    events: Vec<String>,
    /// `whsec_` and the base64 of the signing key: shown only here.
    secret: String,
}

/// Registers a webhook endpoint (admin). Its signing secret is in this
/// answer and never again.
#[utoipa::path(post, path = "/v1/webhooks", tag = "delivery",
    request_body = EndpointBody,
    security(("bearer" = [])),
    responses(
        (status = 201, body = CreatedEndpoint),
        (status = 400, description = "Malformed JSON"),
        (status = 401, description = "No valid token"),
        (status = 403, description = "Not an admin"),
        (status = 415, description = "Not JSON"),
        (status = 422, description = "Not an http(s) URL, or an unknown event type"),
    ))]
async fn create_endpoint(
    State(state): State<AppState>,
    _: Admin,
    ApiJson(body): ApiJson<EndpointBody>,
) -> Result<Response, ApiError> {
    let (url, events) = body.parse().map_err(ApiError::invalid)?;
    let endpoint = Endpoint {
        id: Uuid::new_v4(),
        url,
        events,
        secret: crate::delivery::new_secret(),
        status: "active".into(),
        created_at: Utc::now(),
    };
    state.deliveries.store.create_endpoint(&endpoint).await?;
    let location = format!("/v1/webhooks/{}", endpoint.id);
    let created = CreatedEndpoint {
        id: endpoint.id,
        events: shown(&endpoint),
        url: endpoint.url,
        secret: endpoint.secret,
    };
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(created),
    )
        .into_response())
}

#[derive(Serialize, ToSchema)]
struct EndpointView {
    id: Uuid,
    url: String,
    events: Vec<String>,
    /// `active`, or `disabled` once its receiver answered 410.
    status: String,
    created_at: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
struct Endpoints {
    items: Vec<EndpointView>,
}

/// Every webhook endpoint, oldest first, without their secrets (admin).
#[utoipa::path(get, path = "/v1/webhooks", tag = "delivery",
    security(("bearer" = [])),
    responses(
        (status = 200, body = Endpoints),
        (status = 401, description = "No valid token"),
        (status = 403, description = "Not an admin"),
    ))]
async fn endpoints(State(state): State<AppState>, _: Admin) -> Result<Json<Endpoints>, ApiError> {
    let items = state
        .deliveries
        .store
        .endpoints()
        .await?
        .into_iter()
        .map(|e| EndpointView {
            id: e.id,
            events: shown(&e),
            url: e.url,
            status: e.status,
            created_at: e.created_at,
        })
        .collect();
    Ok(Json(Endpoints { items }))
}

/// Deletes a webhook endpoint and its deliveries (admin): nothing more is
/// sent to it.
#[utoipa::path(delete, path = "/v1/webhooks/{id}", tag = "delivery",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The endpoint's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "The id is not a UUID"),
        (status = 401, description = "No valid token"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such endpoint"),
    ))]
async fn delete_endpoint(
    State(state): State<AppState>,
    _: Admin,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    if state.deliveries.store.delete_endpoint(id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(no_endpoint(id))
    }
}

/// The event types an endpoint gets, as its answers list them.
fn shown(endpoint: &Endpoint) -> Vec<String> {
    WEBHOOK_EVENTS
        .into_iter()
        .filter(|kind| endpoint.wants(kind))
        .map(String::from)
        .collect()
}

fn no_endpoint(id: Uuid) -> ApiError {
    ApiError::NotFound(format!("no webhook endpoint {id}"))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DeliveriesQuery {
    /// 1–200, default 50.
    limit: Option<i64>,
    /// A `next_cursor` of a previous page.
    cursor: Option<String>,
}

/// Deliveries of one listing older than its `n`-th.
#[derive(Serialize, Deserialize)]
struct Cursor {
    deliveries: String,
    before: i64,
}

#[derive(Serialize, ToSchema)]
struct Deliveries {
    items: Vec<DeliveryView>,
    next_cursor: Option<String>,
}

/// A page of the deliveries `filter` picks, the listing at `path` (with
/// `query` besides the cursor) named `listing` in its cursors.
async fn page(
    state: &AppState,
    filter: &DeliveryFilter,
    (limit, cursor): (Option<i64>, Option<&str>),
    listing: String,
    path: &str,
    mut query: Vec<(&str, String)>,
) -> Result<Response, ApiError> {
    let limit = pagination::limit(limit)?;
    let before = match cursor {
        Some(raw) => {
            let cursor: Cursor = pagination::decode(raw)?;
            if cursor.deliveries != listing {
                return Err(pagination::foreign());
            }
            Some(cursor.before)
        }
        None => None,
    };
    // One more than asked says whether there is a next page.
    let mut items = state
        .deliveries
        .store
        .deliveries(filter, limit as usize + 1, before)
        .await?;
    let next_cursor = (items.len() as i64 > limit).then(|| {
        items.truncate(limit as usize);
        pagination::encode(&Cursor {
            deliveries: listing,
            before: items.last().map_or(0, |d| d.n),
        })
    });
    let link = next_cursor.as_ref().and_then(|cursor| {
        query.push(("limit", limit.to_string()));
        query.push(("cursor", cursor.clone()));
        next_link(path, &query)
    });
    let mut response = Json(Deliveries { items, next_cursor }).into_response();
    if let Some(link) = link {
        response.headers_mut().insert(header::LINK, link);
    }
    Ok(response)
}

/// An endpoint's delivery log, newest first (admin): each event sent to it,
/// with its status, tries, last answer and next try.
#[utoipa::path(get, path = "/v1/webhooks/{id}/deliveries", tag = "delivery",
    params(("id" = Uuid, Path, description = "The endpoint's id"), DeliveriesQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Deliveries, headers(("link" = String, description = "`<…>; rel=\"next\"` while more pages follow"))),
        (status = 400, description = "The id is not a UUID, or a malformed or foreign cursor"),
        (status = 401, description = "No valid token"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such endpoint"),
        (status = 422, description = "`limit` outside 1–200"),
    ))]
async fn deliveries(
    State(state): State<AppState>,
    _: Admin,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<DeliveriesQuery>,
) -> Result<Response, ApiError> {
    if !state
        .deliveries
        .store
        .endpoints()
        .await?
        .iter()
        .any(|e| e.id == id)
    {
        return Err(no_endpoint(id));
    }
    let filter = DeliveryFilter {
        endpoint: Some(id),
        ..DeliveryFilter::default()
    };
    page(
        &state,
        &filter,
        (query.limit, query.cursor.as_deref()),
        format!("endpoint:{id}"),
        &format!("/v1/webhooks/{id}/deliveries"),
        Vec::new(),
    )
    .await
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct AllDeliveriesQuery {
    /// `email` or `webhook`; both when absent.
    channel: Option<String>,
    /// `pending`, `delivered` or `failed` (the dead letters); all when absent.
    status: Option<String>,
    /// 1–200, default 50.
    limit: Option<i64>,
    /// A `next_cursor` of a previous page.
    cursor: Option<String>,
}

/// Every delivery, newest first, of a channel and status (admin): with
/// `status=failed`, the deliveries that gave up (a permanent refusal, the
/// retry schedule spent, an endpoint that answered 410), for retrying.
#[utoipa::path(get, path = "/v1/admin/deliveries", tag = "delivery",
    params(AllDeliveriesQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Deliveries, headers(("link" = String, description = "`<…>; rel=\"next\"` while more pages follow"))),
        (status = 400, description = "A malformed or foreign cursor"),
        (status = 401, description = "No valid token"),
        (status = 403, description = "Not an admin"),
        (status = 422, description = "An unknown channel or status, or `limit` outside 1–200"),
    ))]
async fn all_deliveries(
    State(state): State<AppState>,
    _: Admin,
    ApiQuery(query): ApiQuery<AllDeliveriesQuery>,
) -> Result<Response, ApiError> {
    let mut errors = ValidationErrors::new();
    let channel = match query.channel.as_deref().map(|c| (c, Channel::parse(c))) {
        None => None,
        Some((_, Some(channel))) => Some(channel),
        Some((_, None)) => {
            errors.add("channel", "must be email or webhook");
            None
        }
    };
    if let Some(status) = &query.status {
        if !["pending", "delivered", "failed"].contains(&status.as_str()) {
            errors.add("status", "must be pending, delivered or failed");
        }
    }
    errors.into_result(()).map_err(ApiError::invalid)?;
    let mut kept = Vec::new();
    if let Some(channel) = channel {
        kept.push(("channel", channel.as_str().to_string()));
    }
    if let Some(status) = &query.status {
        kept.push(("status", status.clone()));
    }
    let listing = format!(
        "admin:{}:{}",
        channel.map_or("", Channel::as_str),
        query.status.as_deref().unwrap_or_default()
    );
    let filter = DeliveryFilter {
        endpoint: None,
        channel,
        status: query.status.clone(),
    };
    page(
        &state,
        &filter,
        (query.limit, query.cursor.as_deref()),
        listing,
        "/v1/admin/deliveries",
        kept,
    )
    .await
}

/// Sends a failed delivery again, its tries counted afresh (admin).
#[utoipa::path(post, path = "/v1/admin/deliveries/{id}/retry", tag = "delivery",
    params(("id" = Uuid, Path, description = "The delivery's id")),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Pending again: sent soon"),
        (status = 400, description = "The id is not a UUID"),
        (status = 401, description = "No valid token"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such delivery"),
        (status = 409, description = "It has not failed (pending or delivered), or its endpoint is disabled"),
    ))]
async fn retry_delivery(
    State(state): State<AppState>,
    _: Admin,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    match state.deliveries.retry(id).await? {
        Retry::Retried => Ok(StatusCode::ACCEPTED),
        Retry::NotFailed => Err(ApiError::conflict(
            "delivery-not-failed",
            "only a failed delivery can be retried; this one is pending or delivered",
        )),
        Retry::EndpointDisabled => Err(ApiError::conflict(
            "endpoint-disabled",
            "its endpoint answered 410 and is disabled; register the receiver again",
        )),
        Retry::NoSuchDelivery => Err(ApiError::NotFound(format!("no delivery {id}"))),
    }
}
