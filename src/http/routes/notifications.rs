//! Notification commands: admins send announcements; users mark theirs read.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Extension, Json, Router};
use podium_domain::notification::{
    InboxCommand, NotificationCommand, NotificationContent, NotificationKind, NotificationMessage,
};
use podium_domain::{UserId, ValidationErrors};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Principal;
use crate::http::error::ApiError;
use crate::http::extract::{Admin, ApiJson, ApiPath, RequestId};
use crate::http::middleware::idempotency::IdempotencyScope;
use crate::http::AppState;

/// Most recipients of one `POST /v1/notifications`.
pub const MAX_RECIPIENTS: usize = 1_000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/notifications", post(send))
        .route("/v1/me/notifications/{id}/read", post(mark_read))
        .route("/v1/me/notifications/read-all", post(read_all))
}

/// This resource's operations in the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(send, mark_read, read_all))]
pub(super) struct Doc;

#[derive(Deserialize, ToSchema)]
struct SendBody {
    user_ids: Vec<String>,
    kind: Option<String>,
    title: String,
    body: String,
    link: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct Sent {
    notification_ids: Vec<Uuid>,
}

impl SendBody {
    /// One checked content per recipient, or every problem found.
    fn parse(self) -> Result<Vec<NotificationContent>, ValidationErrors> {
        let mut errors = ValidationErrors::new();
        if self.user_ids.is_empty() || self.user_ids.len() > MAX_RECIPIENTS {
            errors.add(
                "user_ids",
                format!("must hold 1 to {MAX_RECIPIENTS} user ids"),
            );
        }
        let mut recipients = Vec::with_capacity(self.user_ids.len());
        let mut seen = std::collections::HashSet::new();
        for (i, raw) in self.user_ids.into_iter().enumerate() {
            match UserId::parse(raw) {
                Ok(user) if !seen.insert(user.clone()) => {
                    errors.add(
                        format!("user_ids[{i}]"),
                        format!("duplicate user id {user}"),
                    );
                }
                Ok(user) => recipients.push(user),
                Err(err) => errors.add(format!("user_ids[{i}]"), err.to_string()),
            }
        }
        let kind = match self.kind.as_deref().map(str::parse::<NotificationKind>) {
            None => NotificationKind::Announcement,
            Some(Ok(kind)) => kind,
            Some(Err(message)) => {
                errors.add("kind", message);
                NotificationKind::Announcement
            }
        };
        let message = match NotificationMessage::new(kind, self.title, self.body, self.link) {
            Ok(message) => message,
            Err(message_errors) => {
                errors.extend(message_errors);
                return Err(errors);
            }
        };
        errors.into_result(
            recipients
                .into_iter()
                .map(|recipient| NotificationContent {
                    recipient,
                    message: message.clone(),
                })
                .collect(),
        )
    }
}

/// Notifications of one send created at once.
const SEND_CONCURRENCY: usize = 8;

/// Creates one notification per recipient. With an `Idempotency-Key`, ids are
/// derived from it, so a retry after a crash half-way creates no duplicates.
/// Sends a notification to each of 1–1,000 users (admin).
#[utoipa::path(post, path = "/v1/notifications", tag = "notifications", request_body = SendBody,
    security(("bearer" = [])),
    responses(
        (status = 202, body = Sent),
        (status = 400, description = "Malformed JSON"),
        (status = 403, description = "Not an admin"),
        (status = 422, description = "Invalid recipients or message"),
    ))]
async fn send(
    State(state): State<AppState>,
    Admin(admin): Admin,
    request: RequestId,
    scope: Option<Extension<IdempotencyScope>>,
    ApiJson(body): ApiJson<SendBody>,
) -> Result<(StatusCode, Json<Sent>), ApiError> {
    use futures::{StreamExt, TryStreamExt};
    let contents = body.parse().map_err(ApiError::invalid)?;
    let now = state.clock.now();
    // One aggregate per recipient, so the commands never conflict: a few
    // at a time, the ids answered in the recipients' order.
    let notification_ids: Vec<Uuid> = futures::stream::iter(contents)
        .map(|content| {
            let notification_id = match &scope {
                Some(Extension(scope)) => scope.derive_id(content.recipient.as_str()),
                None => Uuid::new_v4(),
            };
            let command = NotificationCommand::CreateNotification {
                notification_id,
                content,
                now,
            };
            let (state, metadata) = (&state, request.metadata(&admin));
            async move {
                state
                    .aggregates
                    .notifications
                    .execute(&notification_id.to_string(), command, metadata)
                    .await?;
                Ok::<_, ApiError>(notification_id)
            }
        })
        .buffered(SEND_CONCURRENCY)
        .try_collect()
        .await?;
    Ok((StatusCode::ACCEPTED, Json(Sent { notification_ids })))
}

/// Marks one of your notifications read; idempotent.
#[utoipa::path(post, path = "/v1/me/notifications/{id}/read", tag = "notifications",
    params(("id" = Uuid, Path)),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Read"),
        (status = 400, description = "Malformed id"),
        (status = 403, description = "Not yours"),
        (status = 404, description = "No such notification"),
    ))]
async fn mark_read(
    State(state): State<AppState>,
    principal: Principal,
    request: RequestId,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let command = NotificationCommand::MarkRead {
        by: principal.user_id.clone(),
        now: state.clock.now(),
    };
    let result = state
        .aggregates
        .notifications
        .execute(&id.to_string(), command, request.metadata(&principal))
        .await;
    match result {
        // Two marks raced: the other one recorded the read; same outcome.
        Ok(()) | Err(cqrs_es::AggregateError::AggregateConflict) => Ok(StatusCode::NO_CONTENT),
        Err(err) => Err(err.into()),
    }
}

/// Marks every notification you received so far read.
#[utoipa::path(post, path = "/v1/me/notifications/read-all", tag = "notifications",
    security(("bearer" = [])),
    responses((status = 204, description = "All read"),))]
async fn read_all(
    State(state): State<AppState>,
    principal: Principal,
    request: RequestId,
) -> Result<StatusCode, ApiError> {
    // Nothing unread, and nothing committed that the feed has not applied:
    // a read-all would change nothing, so nothing is recorded.
    if state.store.all_read(principal.user_id.as_str()).await? {
        return Ok(StatusCode::NO_CONTENT);
    }
    let command = InboxCommand::ReadAll {
        user_id: principal.user_id.clone(),
        now: state.clock.now(),
    };
    let result = state
        .aggregates
        .inboxes
        .execute(
            principal.user_id.as_str(),
            command,
            request.metadata(&principal),
        )
        .await;
    match result {
        // A concurrent read-all was recorded instead: everything is read.
        Ok(()) | Err(cqrs_es::AggregateError::AggregateConflict) => Ok(StatusCode::NO_CONTENT),
        Err(err) => Err(err.into()),
    }
}
