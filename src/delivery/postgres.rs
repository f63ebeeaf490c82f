//! The delivery store in Postgres (`migrations/…_delivery.sql`).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::{
    Backlog, Channel, Claimed, DeliveryFilter, DeliveryStore, DeliveryView, EmailSettings,
    Endpoint, Finish, Planned, StoreResult,
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
        for p in planned {
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
        let recorded = sqlx::query(
            "INSERT INTO deliveries
                 (id, channel, target, endpoint_id, event, message_id, priority, payload, next_attempt_at)
             SELECT d.id, d.channel, d.target, d.endpoint_id, d.event, d.message_id, d.priority, d.payload, now()
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::text[], $6::text[],
                         $7::smallint[], $8::jsonb[])
                  AS d (id, channel, target, endpoint_id, event, message_id, priority, payload)
             WHERE d.endpoint_id IS NULL
                OR EXISTS (SELECT 1 FROM webhook_endpoints e WHERE e.id = d.endpoint_id)
             ORDER BY d.priority
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
        .execute(&self.pool)
        .await?;
        Ok(recorded.rows_affected())
    }

    async fn claim(&self, claim: Uuid, lease: Duration, limit: usize) -> StoreResult<Vec<Claimed>> {
        let rows: Vec<(Uuid, String, String, Option<Uuid>, String, serde_json::Value, i32)> =
            sqlx::query_as(
                "WITH due AS (
                     SELECT id FROM deliveries
                     WHERE status = 'pending' AND next_attempt_at <= now()
                     ORDER BY priority, next_attempt_at
                     LIMIT $3
                     FOR UPDATE SKIP LOCKED
                 )
                 UPDATE deliveries d
                 SET claim = $1, next_attempt_at = now() + make_interval(secs => $2)
                 FROM due WHERE d.id = due.id
                 RETURNING d.id, d.channel, d.target, d.endpoint_id, d.message_id, d.payload, d.attempts",
            )
            .bind(claim)
            .bind(seconds(lease))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        let wanted: Vec<Uuid> = rows.iter().filter_map(|r| r.3).collect();
        let endpoints: HashMap<Uuid, Endpoint> = if wanted.is_empty() {
            HashMap::new()
        } else {
            let found: Vec<EndpointRow> = sqlx::query_as(
                "SELECT id, url, events, secret, status, created_at FROM webhook_endpoints
                 WHERE id = ANY($1)",
            )
            .bind(&wanted)
            .fetch_all(&self.pool)
            .await?;
            found
                .into_iter()
                .map(|row| (row.0, endpoint(row)))
                .collect()
        };
        Ok(rows
            .into_iter()
            .filter_map(
                |(id, channel, target, endpoint_id, message_id, payload, attempts)| {
                    Some(Claimed {
                        id,
                        channel: Channel::parse(&channel)?,
                        target,
                        endpoint: endpoint_id.and_then(|e| endpoints.get(&e).cloned()),
                        message_id,
                        payload,
                        attempts: u32::try_from(attempts).unwrap_or_default(),
                        claim,
                    })
                },
            )
            .collect())
    }

    async fn finish(&self, id: Uuid, claim: Uuid, finish: &Finish) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
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

    async fn retry(&self, id: Uuid) -> StoreResult<Option<bool>> {
        let status: Option<String> = sqlx::query_scalar(
            "WITH old AS (SELECT id, status FROM deliveries WHERE id = $1 FOR UPDATE)
             UPDATE deliveries d
             SET status = CASE WHEN old.status = 'failed' THEN 'pending' ELSE d.status END,
                 attempts = CASE WHEN old.status = 'failed' THEN 0 ELSE d.attempts END,
                 next_attempt_at = CASE WHEN old.status = 'failed' THEN now() ELSE d.next_attempt_at END,
                 claim = CASE WHEN old.status = 'failed' THEN NULL ELSE d.claim END
             FROM old WHERE d.id = old.id
             RETURNING old.status",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(status.map(|s| s == "failed"))
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
