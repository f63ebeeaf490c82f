//! The delivery store in Postgres (`migrations/…_delivery.sql`).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::{
    Backlog, Channel, Claimed, DeliveryFilter, DeliveryStore, DeliveryView, EmailSettings,
    Endpoint, Finish, Planned, Retry, StoreResult, Take,
};

pub struct PgDeliveries {
    pub pool: PgPool,
}

type EndpointRow = (Uuid, String, Vec<String>, String, String, DateTime<Utc>);

fn endpoint((id, url, events, secret, status, created_at): EndpointRow) -> Endpoint {
    Endpoint {
        id,
        url,
        events,
        secret,
        status,
        created_at,
    }
}

fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

#[async_trait::async_trait]
impl DeliveryStore for PgDeliveries {
    async fn email_settings(&self, users: &[&str]) -> StoreResult<HashMap<String, EmailSettings>> {
        let rows: Vec<(String, Option<String>, Vec<String>)> = sqlx::query_as(
            "SELECT user_id, email, email_kinds FROM delivery_settings WHERE user_id = ANY($1)",
        )
        .bind(users)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(user, email, email_kinds)| (user, EmailSettings { email, email_kinds }))
            .collect())
    }

    async fn put_email_settings(&self, user: &str, settings: &EmailSettings) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO delivery_settings (user_id, email, email_kinds) VALUES ($1, $2, $3)
             ON CONFLICT (user_id) DO UPDATE
             SET email = $2, email_kinds = $3, updated_at = now()",
        )
        .bind(user)
        .bind(&settings.email)
        .bind(&settings.email_kinds)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn create_endpoint(&self, e: &Endpoint) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO webhook_endpoints (id, url, events, secret, status, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(e.id)
        .bind(&e.url)
        .bind(&e.events)
        .bind(&e.secret)
        .bind(&e.status)
        .bind(e.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn endpoints(&self) -> StoreResult<Vec<Endpoint>> {
        let rows: Vec<EndpointRow> = sqlx::query_as(
            "SELECT id, url, events, secret, status, created_at FROM webhook_endpoints
             ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(endpoint).collect())
    }

    async fn delete_endpoint(&self, id: Uuid) -> StoreResult<bool> {
        let deleted = sqlx::query("DELETE FROM webhook_endpoints WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(deleted.rows_affected() > 0)
    }

    async fn record(&self, planned: &[Planned]) -> StoreResult<u64> {
        let mut ids = Vec::with_capacity(planned.len());
        let mut channels = Vec::with_capacity(planned.len());
        let mut targets = Vec::with_capacity(planned.len());
        let mut endpoints = Vec::with_capacity(planned.len());
        let mut events = Vec::with_capacity(planned.len());
        let mut messages = Vec::with_capacity(planned.len());
        let mut priorities = Vec::with_capacity(planned.len());
        let mut payloads = Vec::with_capacity(planned.len());
        let mut seqs = Vec::with_capacity(planned.len());
        for p in planned {
            seqs.push(i64::try_from(p.seq).unwrap_or(i64::MAX));
            ids.push(p.id);
            channels.push(p.channel.as_str());
            targets.push(p.target.as_str());
            endpoints.push(p.endpoint_id);
            events.push(p.event.as_str());
            messages.push(p.message_id.as_str());
            priorities.push(p.priority);
            payloads.push(&p.payload);
        }
        // An endpoint deleted since the plan has no deliveries: the join
        // drops its rows instead of failing the batch on the foreign key.
        // In log order (the delivery logs list newest first by insertion),
        // which is also one order for every batch: two overlapping batches
        // wait for each other's keys in the same order, never in a cycle.
        let recorded = sqlx::query(
            "INSERT INTO deliveries
                 (id, channel, target, endpoint_id, event, message_id, priority, payload, next_attempt_at)
             SELECT d.id, d.channel, d.target, d.endpoint_id, d.event, d.message_id, d.priority, d.payload, now()
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::text[], $6::text[],
                         $7::smallint[], $8::jsonb[], $9::bigint[])
                  AS d (id, channel, target, endpoint_id, event, message_id, priority, payload, seq)
             WHERE d.endpoint_id IS NULL
                OR EXISTS (SELECT 1 FROM webhook_endpoints e WHERE e.id = d.endpoint_id)
             ORDER BY d.seq, d.id
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&ids)
        .bind(&channels)
        .bind(&targets)
        .bind(&endpoints)
        .bind(&events)
        .bind(&messages)
        .bind(&priorities)
        .bind(&payloads)
        .bind(&seqs)
        .execute(&self.pool)
        .await?;
        Ok(recorded.rows_affected())
    }

    async fn claim(&self, take: &Take<'_>) -> StoreResult<Vec<Claimed>> {
        type Row = (
            Uuid,
            String,
            String,
            serde_json::Value,
            i32,
            Option<Uuid>,
            Option<String>,
            Option<Vec<String>>,
            Option<String>,
            Option<String>,
            Option<DateTime<Utc>>,
        );
        // One channel and priority: a bounded range of `deliveries_due`.
        let rows: Vec<Row> = sqlx::query_as(
            "WITH due AS (
                 SELECT id FROM deliveries
                 WHERE status = 'pending' AND channel = $1 AND priority = $2
                   AND next_attempt_at <= now()
                   AND (endpoint_id IS NULL OR endpoint_id <> ALL($6))
                 ORDER BY next_attempt_at
                 LIMIT $5
                 FOR UPDATE SKIP LOCKED
             ),
             taken AS (
                 UPDATE deliveries d
                 SET claim = $3, next_attempt_at = now() + make_interval(secs => $4)
                 FROM due WHERE d.id = due.id
                 RETURNING d.id, d.target, d.message_id, d.payload, d.attempts, d.endpoint_id
             )
             SELECT t.id, t.target, t.message_id, t.payload, t.attempts,
                    e.id, e.url, e.events, e.secret, e.status, e.created_at
             FROM taken t LEFT JOIN webhook_endpoints e ON e.id = t.endpoint_id",
        )
        .bind(take.channel.as_str())
        .bind(take.priority)
        .bind(take.claim)
        .bind(seconds(take.lease))
        .bind(i64::try_from(take.limit).unwrap_or(i64::MAX))
        .bind(take.skip_endpoints)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(
                    id,
                    target,
                    message_id,
                    payload,
                    attempts,
                    e_id,
                    url,
                    events,
                    secret,
                    status,
                    created,
                )| {
                    let endpoint = match (e_id, url, events, secret, status, created) {
                        (
                            Some(id),
                            Some(url),
                            Some(events),
                            Some(secret),
                            Some(status),
                            Some(at),
                        ) => Some(endpoint((id, url, events, secret, status, at))),
                        _ => None,
                    };
                    Claimed {
                        id,
                        channel: take.channel,
                        target,
                        endpoint,
                        message_id,
                        payload,
                        attempts: u32::try_from(attempts).unwrap_or_default(),
                        claim: take.claim,
                    }
                },
            )
            .collect())
    }

    async fn finish(&self, id: Uuid, claim: Uuid, finish: &Finish) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        // The endpoint first, as every 410 of it does: two of them at once
        // queue here instead of each holding a delivery the other fails.
        if let Some(endpoint) = finish.disable {
            sqlx::query("SELECT 1 FROM webhook_endpoints WHERE id = $1 FOR UPDATE")
                .bind(endpoint)
                .execute(&mut *tx)
                .await?;
        }
        let updated = sqlx::query(
            "UPDATE deliveries
             SET status = $3,
                 attempts = attempts + 1,
                 next_attempt_at = CASE WHEN $3 = 'pending'
                     THEN now() + make_interval(secs => $4) ELSE next_attempt_at END,
                 last_status_code = $5,
                 last_error = $6,
                 delivered_at = CASE WHEN $3 = 'delivered' THEN now() END,
                 claim = NULL
             WHERE id = $1 AND claim = $2 AND status = 'pending'",
        )
        .bind(id)
        .bind(claim)
        .bind(finish.status)
        .bind(finish.retry_in.map_or(0.0, seconds))
        .bind(finish.status_code.map(i32::from))
        .bind(&finish.error)
        .execute(&mut *tx)
        .await?;
        if let Some(endpoint) = finish.disable {
            sqlx::query("UPDATE webhook_endpoints SET status = 'disabled' WHERE id = $1")
                .bind(endpoint)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE deliveries
                 SET status = 'failed', last_error = 'the endpoint is disabled (410 Gone)', claim = NULL
                 WHERE endpoint_id = $1 AND status = 'pending'",
            )
            .bind(endpoint)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(updated.rows_affected() > 0)
    }

    async fn deliveries(
        &self,
        filter: &DeliveryFilter,
        limit: usize,
        before: Option<i64>,
    ) -> StoreResult<Vec<DeliveryView>> {
        type Row = (
            i64,
            Uuid,
            String,
            String,
            String,
            String,
            i32,
            Option<i32>,
            Option<String>,
            DateTime<Utc>,
            Option<DateTime<Utc>>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT n, id, channel, target, event, status, attempts, last_status_code, last_error,
                    next_attempt_at, delivered_at
             FROM deliveries
             WHERE n < $1
               AND ($2::uuid IS NULL OR endpoint_id = $2)
               AND ($3::text IS NULL OR channel = $3)
               AND ($4::text IS NULL OR status = $4)
             ORDER BY n DESC
             LIMIT $5",
        )
        .bind(before.unwrap_or(i64::MAX))
        .bind(filter.endpoint)
        .bind(filter.channel.map(Channel::as_str))
        .bind(&filter.status)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(
                |(
                    n,
                    id,
                    channel,
                    target,
                    event,
                    status,
                    attempts,
                    code,
                    error,
                    next,
                    delivered_at,
                )| {
                    Some(DeliveryView {
                        id,
                        channel: Channel::parse(&channel)?.as_str(),
                        target,
                        event,
                        next_attempt_at: (status == "pending").then_some(next),
                        status,
                        attempts: u32::try_from(attempts).unwrap_or_default(),
                        last_status_code: code.and_then(|c| u16::try_from(c).ok()),
                        last_error: error,
                        delivered_at,
                        n,
                    })
                },
            )
            .collect())
    }

    async fn retry(&self, id: Uuid) -> StoreResult<Retry> {
        let found: Option<(String, bool)> = sqlx::query_as(
            "WITH old AS (
                 SELECT d.id, d.status, COALESCE(e.status <> 'active', false) AS disabled
                 FROM deliveries d LEFT JOIN webhook_endpoints e ON e.id = d.endpoint_id
                 WHERE d.id = $1
                 FOR UPDATE OF d
             ),
             retried AS (
                 UPDATE deliveries d
                 SET status = 'pending', attempts = 0, next_attempt_at = now(), claim = NULL
                 FROM old WHERE d.id = old.id AND old.status = 'failed' AND NOT old.disabled
                 RETURNING d.id
             )
             SELECT status, disabled FROM old",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match found {
            None => Retry::NoSuchDelivery,
            Some((status, _)) if status != "failed" => Retry::NotFailed,
            Some((_, true)) => Retry::EndpointDisabled,
            Some(_) => Retry::Retried,
        })
    }

    async fn intake_mark(&self, channel: Channel) -> StoreResult<Option<u64>> {
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT seq FROM delivery_intake WHERE channel = $1")
                .bind(channel.as_str())
                .fetch_optional(&self.pool)
                .await?;
        Ok(seq.and_then(|s| u64::try_from(s).ok()))
    }

    async fn begin_intake(&self, channel: Channel, seq: u64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO delivery_intake (channel, seq) VALUES ($1, $2)
             ON CONFLICT (channel) DO NOTHING",
        )
        .bind(channel.as_str())
        .bind(i64::try_from(seq).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn note_intake(&self, channel: Channel, seq: u64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO delivery_intake (channel, seq) VALUES ($1, $2)
             ON CONFLICT (channel) DO UPDATE SET seq = GREATEST(delivery_intake.seq, $2)",
        )
        .bind(channel.as_str())
        .bind(i64::try_from(seq).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn backlog(&self) -> StoreResult<HashMap<Channel, Backlog>> {
        let rows: Vec<(String, i64, f64)> = sqlx::query_as(
            "SELECT channel, count(*),
                    COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::float8, 0)
             FROM deliveries WHERE status = 'pending' GROUP BY channel",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(channel, pending, oldest_secs)| {
                Some((
                    Channel::parse(&channel)?,
                    Backlog {
                        pending,
                        oldest_secs,
                    },
                ))
            })
            .collect())
    }

    async fn purge(&self, before: DateTime<Utc>) -> StoreResult<u64> {
        let purged =
            sqlx::query("DELETE FROM deliveries WHERE status <> 'pending' AND created_at < $1")
                .bind(before)
                .execute(&self.pool)
                .await?;
        Ok(purged.rows_affected())
    }
}
