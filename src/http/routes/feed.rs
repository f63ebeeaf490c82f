//! The caller's notification feed: pages newest first, the unread count, and
//! the stream of `notification`, `read` and `unread_count` events.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use podium_domain::log::Change;
use podium_projections::feed::{self, FeedItem};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

use crate::auth::Principal;
use crate::http::cached::{self, JsonBody, Loaded};
use crate::http::error::ApiError;
use crate::http::extract::ApiQuery;
use crate::http::pagination::{self, next_link};
use crate::http::sse::{self, CatchUp, Frames, StreamQuery, StreamSource};
use crate::http::AppState;
use crate::query::cache::CacheKey;
use crate::query::store::FeedPage;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/me/notifications", get(page))
        .route("/v1/me/notifications/unread-count", get(unread_count))
        .route("/v1/me/notifications/stream", get(stream))
}

/// This resource's operations in the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(page, unread_count, stream))]
pub(super) struct Doc;

/// Items older than the one created at log seq `before`, of `user`.
#[derive(Serialize, Deserialize)]
struct Cursor {
    #[serde(rename = "feed")]
    user: String,
    before: u64,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct PageQuery {
    /// 1–200, default 50.
    limit: Option<i64>,
    /// A `next_cursor` of a previous page.
    cursor: Option<String>,
    /// Only unread items.
    #[serde(default)]
    unread_only: bool,
}

#[derive(Serialize, ToSchema)]
struct FeedPageView {
    items: Vec<FeedItem>,
    unread_count: u64,
    next_cursor: Option<String>,
}

/// Your notifications, newest first, with the exact unread count.
#[utoipa::path(get, path = "/v1/me/notifications", tag = "notifications",
    params(PageQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, body = FeedPageView, headers(("link" = String, description = "`<…>; rel=\"next\"` while more pages follow"))),
        (status = 400, description = "Malformed or foreign cursor (`invalid-cursor`), or one too old (`cursor-expired`)"),
        (status = 422, description = "`limit` outside 1–200, or cursor and offset together"),
    ))]
async fn page(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<Response, ApiError> {
    let limit = pagination::limit(query.limit)?;
    let user = principal.user_id.as_str();
    let before = match &query.cursor {
        None => None,
        Some(raw) => {
            let cursor: Cursor = pagination::decode(raw)?;
            if cursor.user != user {
                return Err(pagination::foreign());
            }
            Some(cursor.before)
        }
    };
    let FeedPage {
        items,
        more,
        unread: unread_count,
    } = state
        .store
        .feed_page(user, before, query.unread_only, limit)
        .await?;
    let next_cursor = items.last().filter(|_| more).map(|last| {
        pagination::encode(&Cursor {
            user: user.to_string(),
            before: last.feed_seq,
        })
    });
    let link = next_cursor.as_ref().and_then(|cursor| {
        next_link(
            "/v1/me/notifications",
            &[
                ("limit", limit.to_string()),
                ("unread_only", query.unread_only.to_string()),
                ("cursor", cursor.clone()),
            ],
        )
    });
    let view = FeedPageView {
        items,
        unread_count,
        next_cursor,
    };
    Ok((&JsonBody::new(&view, link)?).into_response())
}

/// Your unread count: `{"unread_count"}`.
#[utoipa::path(get, path = "/v1/me/notifications/unread-count", tag = "notifications",
    security(("bearer" = [])),
    responses((status = 200, description = "`{\"unread_count\": 3}`"),))]
async fn unread_count(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Response, ApiError> {
    let user = principal.user_id.to_string();
    let key = CacheKey::Unread {
        user_id: user.clone(),
    };
    let load = async {
        let (seq, _, unread_count) = state.store.feed_changed_since(&user, None, 0).await?;
        Ok(Loaded {
            answer: JsonBody::new(&json!({ "unread_count": unread_count }), None),
            seq,
        })
    };
    let body = cached::get_or_load(&state.cache, key, load).await?;
    Ok((&body).into_response())
}

/// Feed events of one user.
struct Notifications {
    state: AppState,
    user: String,
}

impl StreamSource for Notifications {
    fn kind(&self) -> &'static str {
        "feed"
    }

    /// Items created since `after` as `notification` events (in their
    /// current state), items read since as `read` events, then the unread
    /// count; a fresh client gets the unread count alone.
    async fn catch_up(&self, after: Option<u64>) -> Result<CatchUp, ApiError> {
        let (seq, changed, unread_count) = self
            .state
            .store
            .feed_changed_since(&self.user, after, sse::CATCH_UP_LIMIT + 1)
            .await?;
        let mut caught = CatchUp::at(seq);
        if changed.len() as i64 > sse::CATCH_UP_LIMIT {
            caught.resync();
        } else {
            let after = after.unwrap_or(0);
            let mut read: Vec<&FeedItem> = Vec::new();
            for (i, change) in changed.iter().enumerate() {
                if change.item.feed_seq > after {
                    caught.push(change.seq, "notification", &json!(change.item));
                    continue;
                }
                // Items read by one event (a read-all) form one `read` event.
                read.push(&change.item);
                if changed.get(i + 1).is_none_or(|next| next.seq != change.seq) {
                    let ids: Vec<_> = read.drain(..).map(|item| item.id).collect();
                    caught.push(change.seq, "read", &json!({ "ids": ids }));
                }
            }
        }
        let seq = caught.seq;
        caught.push(
            seq,
            "unread_count",
            &json!({ "unread_count": unread_count }),
        );
        Ok(caught)
    }

    fn render(change: &Change, out: &mut Frames) {
        let data = &change.data;
        if let Some(item) = data.get("notification") {
            out.json(change.seq, "notification", item);
        }
        if let Some(ids) = data.get("read") {
            out.json(change.seq, "read", &json!({ "ids": ids }));
        }
        if let Some(unread_count) = data.get("unread_count") {
            let count = json!({ "unread_count": unread_count });
            out.json(change.seq, "unread_count", &count);
        }
    }
}

/// Server-Sent Events: `notification` (a feed item), `read` `{"ids"}`,
/// `unread_count` `{"unread_count"}`; `resync` when a resume missed too
/// much. Ids are log seqs; resume with `Last-Event-ID`.
#[utoipa::path(get, path = "/v1/me/notifications/stream", tag = "notifications",
    params(("last-event-id" = Option<String>, Header), crate::http::sse::StreamQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", headers(("cache-control" = String, description = "no-cache"), ("x-accel-buffering" = String, description = "no"))),
        (status = 400, description = "Malformed Last-Event-ID"),
        (status = 429, description = "Too many open streams"),
    ))]
async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<StreamQuery>,
) -> Result<Response, ApiError> {
    let principal = query.caller(&state, &headers).await?;
    let last_event_id = query.last_event_id(&headers)?;
    let user = principal.user_id.to_string();
    let source = Notifications {
        state: state.clone(),
        user: user.clone(),
    };
    sse::open(&state, &user, source, feed::TOPIC, &user, last_event_id).await
}
