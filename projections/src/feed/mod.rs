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

    /// Takes `read` items off `user_id`'s unread count and returns the new
    /// count. Reads only follow items counted in, so the row exists.
    async fn count_read(
        &self,
        conn: &mut PgConnection,
        user_id: &str,
        read: i32,
    ) -> Result<i32, sqlx::Error> {
        sqlx::query_scalar(&format!(
            "UPDATE {c} SET unread = unread - $2 WHERE user_id = $1 RETURNING unread",
            c = self.counters
        ))
        .bind(user_id)
        .bind(read)
        .fetch_one(conn)
        .await
    }
}

/// A notification created, as a feed item to insert.
struct Created {
    seq: u64,
    user: String,
    item: FeedItem,
}

/// Whether events of `aggregate_type` can change a feed (notifications are
/// created and read; inboxes are read all at once).
fn is_feeds(aggregate_type: &str) -> bool {
    matches!(aggregate_type, "Notification" | "Inbox")
}

/// The notification `event` creates, if it creates one.
fn created_of(event: &RecordedEvent) -> Result<Option<Created>, BoxError> {
    if event.event_type != "NotificationCreated" {
        return Ok(None);
    }
    let PodiumEvent::Notification(NotificationEvent::NotificationCreated {
        notification_id,
        content,
        created_at,
    }) = event.decode()?
    else {
        return Ok(None);
    };
    Ok(Some(Created {
        seq: event.seq,
        user: content.recipient.to_string(),
        item: FeedItem::created(notification_id, &content.message, created_at, event.seq),
    }))
}

impl FeedProjection {
    /// Inserts a run of created notifications with one statement, counts
    /// them in with another, and returns each new item's change with the
    /// unread count it brought its user to.
    async fn create_all(
        &self,
        conn: &mut PgConnection,
        run: Vec<Created>,
    ) -> Result<Vec<Change>, BoxError> {
        if run.is_empty() {
            return Ok(Vec::new());
        }
        let inserted: Vec<uuid::Uuid> = sqlx::query_scalar(&format!(
            "INSERT INTO {} (notification_id, user_id, feed_seq, kind, title, body, link,
                             created_at, changed_seq)
             SELECT id, u, s, k, t, b, l, c, s
               FROM UNNEST($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::text[],
                           $6::text[], $7::text[], $8::timestamptz[]) AS r(id, u, s, k, t, b, l, c)
             ON CONFLICT (notification_id) DO NOTHING
             RETURNING notification_id",
            self.items
        ))
        .bind(run.iter().map(|c| c.item.id).collect::<Vec<_>>())
        .bind(run.iter().map(|c| c.user.clone()).collect::<Vec<_>>())
        .bind(run.iter().map(|c| c.seq as i64).collect::<Vec<_>>())
        .bind(run.iter().map(|c| c.item.kind.clone()).collect::<Vec<_>>())
        .bind(run.iter().map(|c| c.item.title.clone()).collect::<Vec<_>>())
        .bind(run.iter().map(|c| c.item.body.clone()).collect::<Vec<_>>())
        .bind(run.iter().map(|c| c.item.link.clone()).collect::<Vec<_>>())
        .bind(run.iter().map(|c| c.item.created_at).collect::<Vec<_>>())
        .fetch_all(&mut *conn)
        .await?;
        let inserted: std::collections::HashSet<uuid::Uuid> = inserted.into_iter().collect();
        let new: Vec<Created> = run
            .into_iter()
            .filter(|c| inserted.contains(&c.item.id))
            .collect();
        let mut per_user: std::collections::HashMap<&str, i32> = Default::default();
        for created in &new {
            *per_user.entry(&created.user).or_default() += 1;
        }
        if per_user.is_empty() {
            return Ok(Vec::new());
        }
        let (users, deltas): (Vec<&str>, Vec<i32>) = per_user.into_iter().unzip();
        let counts: Vec<(String, i32)> = sqlx::query_as(&format!(
            "INSERT INTO {c} (user_id, unread) SELECT * FROM UNNEST($1::text[], $2::int[])
             ON CONFLICT (user_id) DO UPDATE SET unread = {c}.unread + EXCLUDED.unread
             RETURNING user_id, unread",
            c = self.counters
        ))
        .bind(&users)
        .bind(&deltas)
        .fetch_all(&mut *conn)
        .await?;
        // Walking back from each user's count after the run gives the count
        // each item brought its user to.
        let mut unread: std::collections::HashMap<String, i32> = counts.into_iter().collect();
        let mut changes: Vec<Change> = new
            .iter()
            .rev()
            .map(|c| {
                let count = unread.get_mut(&c.user).expect("every user was counted");
                let change = created_change(&c.user, c.seq, &c.item, *count as u64);
                *count -= 1;
                change
            })
            .collect();
        changes.reverse();
        Ok(changes)
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
        prev: None,
    }
}

impl ProjectionLogic for FeedProjection {
    fn name(&self) -> &str {
        match self.generation {
            Generation::Live => NAME,
            Generation::Next => "feed__next",
        }
    }

    fn wants(&self, aggregate_type: &str, _event_type: &str) -> bool {
        is_feeds(aggregate_type)
    }

    /// Runs of created notifications go in set-wise; reads, which depend
    /// on what came before them, one by one in between.
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<Vec<Change>, BoxError> {
        let mut changes = Vec::new();
        let mut run = Vec::new();
        for event in events {
            if let Some(created) = created_of(event)? {
                run.push(created);
                continue;
            }
            if !is_feeds(&event.aggregate_type) {
                continue;
            }
            changes.extend(self.create_all(conn, std::mem::take(&mut run)).await?);
            changes.extend(self.apply_read(conn, event).await?);
        }
        changes.extend(self.create_all(conn, run).await?);
        Ok(changes)
    }
}

impl FeedProjection {
    /// Applies a read (of one notification, or of all a user has).
    async fn apply_read(
        &self,
        conn: &mut PgConnection,
        event: &RecordedEvent,
    ) -> Result<Vec<Change>, BoxError> {
        let seq = event.seq as i64;
        Ok(match event.decode()? {
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
                let unread = self.count_read(conn, &user, 1).await?;
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
                let unread = self.count_read(conn, &user, ids.len() as i32).await?;
                vec![read_change(&user, event.seq, &ids, unread as u64)]
            }
            _ => Vec::new(),
        })
    }
}

/// The feeds computed in memory from the log, by the same rules as
/// [`FeedProjection`] (a notification created twice counts once; a read
/// marks an unread item and takes it off its recipient's count; reading
/// all marks every unread item the user received before it), written with
/// COPY. A log holds about one notification per submission (the policy
/// grades each), so a replay without it would apply them a batch at a time.
#[derive(Default)]
pub struct FeedFold {
    items: Vec<Folded>,
    /// Where each notification is in `items`.
    at: std::collections::HashMap<uuid::Uuid, usize>,
    /// Each recipient's unread count, and the items that may still be
    /// unread (a read of one alone leaves it here, marked).
    users: std::collections::HashMap<String, (i32, Vec<usize>)>,
}

/// A feed item as the fold keeps it.
struct Folded {
    user: String,
    item: FeedItem,
    changed_seq: u64,
}

impl FeedFold {
    fn create(&mut self, created: Created) {
        let std::collections::hash_map::Entry::Vacant(slot) = self.at.entry(created.item.id) else {
            return;
        };
        let index = self.items.len();
        slot.insert(index);
        // Looked up before it is inserted: most users are met again.
        if !self.users.contains_key(&created.user) {
            self.users.insert(created.user.clone(), Default::default());
        }
        let (unread, unread_items) = self.users.get_mut(&created.user).expect("just inserted");
        *unread += 1;
        unread_items.push(index);
        self.items.push(Folded {
            user: created.user,
            changed_seq: created.seq,
            item: created.item,
        });
    }

    /// Takes `read` items off `user`'s count, which exists: reads only
    /// follow items counted in (as [`FeedProjection::count_read`] finds).
    fn count_read(&mut self, user: &str, read: i32) -> Result<(), BoxError> {
        match self.users.get_mut(user) {
            Some((unread, _)) if *unread >= read => {
                *unread -= read;
                Ok(())
            }
            _ => Err(format!("{user} read {read} notifications not counted in").into()),
        }
    }

    fn read(&mut self, event: &RecordedEvent) -> Result<(), BoxError> {
        match event.decode()? {
            PodiumEvent::Notification(NotificationEvent::NotificationRead {
                notification_id,
                recipient,
                read_at,
            }) => {
                let Some(&index) = self.at.get(&notification_id) else {
                    return Ok(());
                };
                let folded = &mut self.items[index];
                if folded.item.read_at.is_some() {
                    return Ok(());
                }
                folded.item.read_at = Some(read_at);
                folded.changed_seq = event.seq;
                self.count_read(recipient.as_str(), 1)
            }
            PodiumEvent::Inbox(InboxEvent::AllNotificationsRead { user_id, read_at }) => {
                // Every item folded so far came earlier in the log.
                let Some((_, unread_items)) = self.users.get_mut(user_id.as_str()) else {
                    return Ok(());
                };
                let mut read = 0;
                for index in std::mem::take(unread_items) {
                    let folded = &mut self.items[index];
                    if folded.item.read_at.is_none() {
                        folded.item.read_at = Some(read_at);
                        folded.changed_seq = event.seq;
                        read += 1;
                    }
                }
                if read > 0 {
                    self.count_read(user_id.as_str(), read)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

impl crate::fold::Fold for FeedFold {
    fn expect(&mut self, rows: &dyn Fn(&str) -> usize) {
        let items = rows("feed_items");
        self.items.reserve(items);
        self.at.reserve(items);
        self.users.reserve(rows("feed_counters"));
    }

    fn add(&mut self, events: &[RecordedEvent]) -> Result<(), BoxError> {
        for event in events {
            if let Some(created) = created_of(event)? {
                self.create(created);
            } else if is_feeds(&event.aggregate_type) {
                self.read(event)?;
            }
        }
        Ok(())
    }

    fn write<'c>(
        self: Box<Self>,
        conn: &'c mut PgConnection,
    ) -> futures::future::BoxFuture<'c, Result<(), sqlx::Error>> {
        Box::pin(async move {
            use crate::fold::CopyWriter;
            let next = Generation::Next;
            let mut rows = CopyWriter::fresh(
                conn,
                &next.table("feed_items"),
                "notification_id, user_id, feed_seq, kind, title, body, link, created_at, read_at, changed_seq",
            )
            .await?;
            // In key order: the copy's primary key then grows at its right
            // edge instead of splitting pages all over.
            let mut items = self.items;
            items.sort_unstable_by_key(|folded| folded.item.id);
            for Folded {
                user,
                item,
                changed_seq,
            } in &items
            {
                rows.field(item.id)
                    .field(user)
                    .field(item.feed_seq)
                    .field(&item.kind)
                    .field(&item.title)
                    .field(&item.body)
                    .field(&item.link)
                    .field(item.created_at)
                    .field(item.read_at)
                    .field(changed_seq);
                rows.end_row().await?;
            }
            rows.finish().await?;
            let mut rows =
                CopyWriter::fresh(conn, &next.table("feed_counters"), "user_id, unread").await?;
            let mut users: Vec<_> = self.users.into_iter().collect();
            users.sort_unstable_by(|(a, _), (b, _)| a.cmp(b));
            for (user, (unread, _)) in &users {
                rows.field(user).field(unread);
                rows.end_row().await?;
            }
            rows.finish().await?;
            Ok(())
        })
    }
}
