//! Reads of the notification feeds: pages newest first, unread counts, and
//! what changed since a point in the log (for SSE resume).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgExecutor, Row};
use uuid::Uuid;

/// A feed item as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FeedItem {
    pub id: Uuid,
    pub kind: String,
    pub title: String,
    pub body: String,
    pub link: Option<String>,
    #[serde(serialize_with = "podium_domain::time::serialize")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "podium_domain::time::serialize_option")]
    pub read_at: Option<DateTime<Utc>>,
    /// The log seq that created the item: the feed's order and its cursor.
    #[serde(skip)]
    pub feed_seq: u64,
}

impl FeedItem {
    /// The unread item a `NotificationCreated` event at `seq` makes.
    pub fn created(
        id: Uuid,
        message: &podium_domain::notification::NotificationMessage,
        created_at: DateTime<Utc>,
        seq: u64,
    ) -> Self {
        Self {
            id,
            kind: message.kind.as_str().to_string(),
            title: message.title.clone(),
            body: message.body.clone(),
            link: message.link.clone(),
            created_at,
            read_at: None,
            feed_seq: seq,
        }
    }
}

/// A feed item changed after some seq: created (and maybe read) since, or
/// created before and read since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedChange {
    /// The log seq of the item's last change.
    pub seq: u64,
    pub item: FeedItem,
}

const ITEM_COLUMNS: &str =
    "notification_id, kind, title, body, link, created_at, read_at, feed_seq, changed_seq";

fn item_from_row(row: &PgRow) -> Result<FeedItem, sqlx::Error> {
    Ok(FeedItem {
        id: row.try_get("notification_id")?,
        kind: row.try_get("kind")?,
        title: row.try_get("title")?,
        body: row.try_get("body")?,
        link: row.try_get("link")?,
        created_at: row.try_get("created_at")?,
        read_at: row.try_get("read_at")?,
        feed_seq: row.try_get::<i64, _>("feed_seq")? as u64,
    })
}

/// Reads the live feed tables.
pub struct FeedQueries;

impl FeedQueries {
    /// Up to `limit` items of `user_id`, newest first, older than the item
    /// created at `before` (from the newest when `None`); only unread ones
    /// with `unread_only`. The flag tells whether older items follow.
    pub async fn page(
        conn: &mut PgConnection,
        user_id: &str,
        before: Option<u64>,
        unread_only: bool,
        limit: i64,
    ) -> Result<(Vec<FeedItem>, bool), sqlx::Error> {
        let rows = sqlx::query(&format!(
            "SELECT {ITEM_COLUMNS} FROM feed_items
              WHERE user_id = $1 AND feed_seq < $2 AND ($3 = false OR read_at IS NULL)
              ORDER BY feed_seq DESC LIMIT $4"
        ))
        .bind(user_id)
        .bind(before.map_or(i64::MAX, |seq| seq as i64))
        .bind(unread_only)
        .bind(limit + 1)
        .fetch_all(conn)
        .await?;
        let mut items = rows
            .iter()
            .map(item_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let more = items.len() as i64 > limit;
        items.truncate(limit as usize);
        Ok((items, more))
    }

    /// `user_id`'s unread items, exactly.
    pub async fn unread<'e>(db: impl PgExecutor<'e>, user_id: &str) -> Result<u64, sqlx::Error> {
        let unread: Option<i32> =
            sqlx::query_scalar("SELECT unread FROM feed_counters WHERE user_id = $1")
                .bind(user_id)
                .fetch_optional(db)
                .await?;
        Ok(unread.unwrap_or(0) as u64)
    }

    /// Up to `limit` of `user_id`'s items changed after seq `after`, oldest
    /// change first.
    pub async fn changed_since(
        conn: &mut PgConnection,
        user_id: &str,
        after: u64,
        limit: i64,
    ) -> Result<Vec<FeedChange>, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "SELECT {ITEM_COLUMNS} FROM feed_items
              WHERE user_id = $1 AND changed_seq > $2 ORDER BY changed_seq, feed_seq LIMIT $3"
        ))
        .bind(user_id)
        .bind(after as i64)
        .bind(limit)
        .fetch_all(conn)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(FeedChange {
                    seq: row.try_get::<i64, _>("changed_seq")? as u64,
                    item: item_from_row(row)?,
                })
            })
            .collect()
    }
}
