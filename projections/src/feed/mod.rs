//! The notification-feed projection: items newest first, read state and
//! exact unread counts, kept in one transaction.

use podium_domain::log::{Change, PodiumEvent, RecordedEvent};
use podium_domain::notification::{InboxEvent, NotificationEvent};
use serde_json::json;
use sqlx::PgConnection;

use crate::checkpointed::{BoxError, ProjectionLogic};
use crate::tables::Generation;

mod queries;
pub use queries::{FeedChange, FeedItem, FeedQueries};

pub const NAME: &str = "feed";
pub const TABLES: [&str; 2] = ["feed_items", "feed_counters"];
/// The topic of feed change notifications (key: the user id).
pub const TOPIC: &str = "feed";

pub struct FeedProjection {
    generation: Generation,
    items: String,
    counters: String,
}

impl FeedProjection {
    pub fn new(generation: Generation) -> Self {
        Self {
            generation,
            items: generation.table("feed_items"),
            counters: generation.table("feed_counters"),
        }
    }

    /// Adds `delta` to `user_id`'s unread count and returns the new count.
    async fn count_unread(
        &self,
        conn: &mut PgConnection,
        user_id: &str,
        delta: i32,
    ) -> Result<i32, sqlx::Error> {
        // A decrement only follows items counted in, so the row exists; an
        // upsert would check the constraint on `delta` itself.
        let query = if delta < 0 {
            format!(
                "UPDATE {c} SET unread = unread + $2 WHERE user_id = $1 RETURNING unread",
                c = self.counters
            )
        } else {
            format!(
                "INSERT INTO {c} (user_id, unread) VALUES ($1, $2)
                 ON CONFLICT (user_id) DO UPDATE SET unread = {c}.unread + $2
                 RETURNING unread",
                c = self.counters
            )
        };
        sqlx::query_scalar(&query)
            .bind(user_id)
            .bind(delta)
            .fetch_one(conn)
            .await
    }
}

/// The change a new feed item announces.
pub fn created_change(user_id: &str, seq: u64, item: &FeedItem, unread: u64) -> Change {
    change(
        user_id,
        seq,
        json!({ "notification": item, "unread_count": unread }),
    )
}

/// The change items being read announce.
pub fn read_change(user_id: &str, seq: u64, ids: &[uuid::Uuid], unread: u64) -> Change {
    change(user_id, seq, json!({ "read": ids, "unread_count": unread }))
}

fn change(user_id: &str, seq: u64, data: serde_json::Value) -> Change {
    Change {
        topic: TOPIC.into(),
        key: user_id.to_string(),
        seq,
        data,
    }
}

impl ProjectionLogic for FeedProjection {
    fn name(&self) -> &str {
        match self.generation {
            Generation::Live => NAME,
            Generation::Next => "feed__next",
        }
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        event: &RecordedEvent,
    ) -> Result<Vec<Change>, BoxError> {
        if !matches!(event.aggregate_type.as_str(), "Notification" | "Inbox") {
            return Ok(Vec::new());
        }
        let seq = event.seq as i64;
        Ok(match event.decode()? {
            PodiumEvent::Notification(NotificationEvent::NotificationCreated {
                notification_id,
                content,
                created_at,
            }) => {
                let user = content.recipient.to_string();
                let message = &content.message;
                let inserted = sqlx::query(&format!(
                    "INSERT INTO {} (notification_id, user_id, feed_seq, kind, title, body, link,
                                     created_at, changed_seq)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $3)
                     ON CONFLICT (notification_id) DO NOTHING",
                    self.items
                ))
                .bind(notification_id)
                .bind(&user)
                .bind(seq)
                .bind(message.kind.as_str())
                .bind(&message.title)
                .bind(&message.body)
                .bind(&message.link)
                .bind(created_at)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                if inserted == 0 {
                    return Ok(Vec::new());
                }
                let unread = self.count_unread(conn, &user, 1).await?;
                let item = FeedItem::created(notification_id, message, created_at, event.seq);
                vec![created_change(&user, event.seq, &item, unread as u64)]
            }
            PodiumEvent::Notification(NotificationEvent::NotificationRead {
                notification_id,
                recipient,
                read_at,
            }) => {
                let user = recipient.to_string();
                let marked = sqlx::query(&format!(
                    "UPDATE {} SET read_at = $2, changed_seq = $3
                      WHERE notification_id = $1 AND read_at IS NULL",
                    self.items
                ))
                .bind(notification_id)
                .bind(read_at)
                .bind(seq)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                if marked == 0 {
                    return Ok(Vec::new());
                }
                let unread = self.count_unread(conn, &user, -1).await?;
                vec![read_change(
                    &user,
                    event.seq,
                    &[notification_id],
                    unread as u64,
                )]
            }
            PodiumEvent::Inbox(InboxEvent::AllNotificationsRead { user_id, read_at }) => {
                let user = user_id.to_string();
                // Everything the user received earlier in the log is read.
                let ids: Vec<uuid::Uuid> = sqlx::query_scalar(&format!(
                    "UPDATE {} SET read_at = $2, changed_seq = $3
                      WHERE user_id = $1 AND read_at IS NULL AND feed_seq < $3
                      RETURNING notification_id",
                    self.items
                ))
                .bind(&user)
                .bind(read_at)
                .bind(seq)
                .fetch_all(&mut *conn)
                .await?;
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let unread = self.count_unread(conn, &user, -(ids.len() as i32)).await?;
                vec![read_change(&user, event.seq, &ids, unread as u64)]
            }
            _ => Vec::new(),
        })
    }
}
