//! The delivery store of the embedded mode: the same rules as Postgres's,
//! in this process's memory (gone at exit, like its read models).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{
    Backlog, Channel, Claimed, DeliveryFilter, DeliveryStore, DeliveryView, EmailSettings,
    Endpoint, Finish, Planned, Retry, StoreResult, Take,
};

struct Row {
    planned: Planned,
    created_at: DateTime<Utc>,
    status: &'static str,
    attempts: u32,
    last_status_code: Option<u16>,
    last_error: Option<String>,
    next_attempt_at: DateTime<Utc>,
    claim: Option<Uuid>,
    delivered_at: Option<DateTime<Utc>>,
}

#[derive(Default)]
struct State {
    settings: HashMap<String, EmailSettings>,
    endpoints: Vec<Endpoint>,
    /// In the order recorded: a row's place is its `n`, which never changes
    /// (a deleted or purged row leaves its place empty).
    rows: Vec<Option<Row>>,
    ids: HashMap<Uuid, usize>,
    marks: HashMap<Channel, u64>,
}

impl State {
    fn live(&self) -> impl DoubleEndedIterator<Item = (usize, &Row)> {
        self.rows
            .iter()
            .enumerate()
            .filter_map(|(n, row)| Some((n, row.as_ref()?)))
    }

    fn row_mut(&mut self, id: Uuid) -> Option<&mut Row> {
        let n = *self.ids.get(&id)?;
        self.rows[n].as_mut()
    }

    /// Empties the places of the rows `gone` picks.
    fn remove(&mut self, gone: impl Fn(&Row) -> bool) -> usize {
        let mut removed = 0;
        for slot in &mut self.rows {
            if slot.as_ref().is_some_and(&gone) {
                if let Some(row) = slot.take() {
                    self.ids.remove(&row.planned.id);
                    removed += 1;
                }
            }
        }
        removed
    }
}

#[derive(Default)]
pub struct MemoryDeliveries {
    state: Mutex<State>,
}

impl MemoryDeliveries {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn later(at: DateTime<Utc>, by: Duration) -> DateTime<Utc> {
    at + chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX)
}

#[async_trait::async_trait]
impl DeliveryStore for MemoryDeliveries {
    async fn email_settings(&self, users: &[&str]) -> StoreResult<HashMap<String, EmailSettings>> {
        let state = self.state();
        Ok(users
            .iter()
            .filter_map(|user| Some((user.to_string(), state.settings.get(*user)?.clone())))
            .collect())
    }

    async fn put_email_settings(&self, user: &str, settings: &EmailSettings) -> StoreResult<()> {
        self.state()
            .settings
            .insert(user.to_string(), settings.clone());
        Ok(())
    }

    async fn create_endpoint(&self, endpoint: &Endpoint) -> StoreResult<()> {
        self.state().endpoints.push(endpoint.clone());
        Ok(())
    }

    async fn endpoints(&self) -> StoreResult<Vec<Endpoint>> {
        Ok(self.state().endpoints.clone())
    }

    async fn delete_endpoint(&self, id: Uuid) -> StoreResult<bool> {
        let mut state = self.state();
        let before = state.endpoints.len();
        state.endpoints.retain(|e| e.id != id);
        let deleted = state.endpoints.len() < before;
        // As the foreign key's cascade does: its deliveries go with it.
        state.remove(|row| row.planned.endpoint_id == Some(id));
        Ok(deleted)
    }

    async fn record(&self, planned: &[Planned]) -> StoreResult<u64> {
        let mut state = self.state();
        let now = Utc::now();
        let mut recorded = 0;
        for p in planned {
            let known_endpoint = p
                .endpoint_id
                .is_none_or(|id| state.endpoints.iter().any(|e| e.id == id));
            if state.ids.contains_key(&p.id) || !known_endpoint {
                continue;
            }
            let n = state.rows.len();
            state.ids.insert(p.id, n);
            state.rows.push(Some(Row {
                planned: p.clone(),
                created_at: now,
                status: "pending",
                attempts: 0,
                last_status_code: None,
                last_error: None,
                next_attempt_at: now,
                claim: None,
                delivered_at: None,
            }));
            recorded += 1;
        }
        Ok(recorded)
    }

    async fn claim(&self, take: &Take<'_>) -> StoreResult<Vec<Claimed>> {
        let mut state = self.state();
        let now = Utc::now();
        let mut due: Vec<(DateTime<Utc>, usize)> = state
            .live()
            .filter(|(_, row)| {
                row.status == "pending"
                    && row.planned.channel == take.channel
                    && row.planned.priority == take.priority
                    && row.next_attempt_at <= now
                    && row
                        .planned
                        .endpoint_id
                        .is_none_or(|e| !take.skip_endpoints.contains(&e))
            })
            .map(|(n, row)| (row.next_attempt_at, n))
            .collect();
        due.sort();
        due.truncate(take.limit);
        let mut claimed = Vec::with_capacity(due.len());
        for (_, n) in due {
            let endpoint_id = state.rows[n].as_ref().and_then(|r| r.planned.endpoint_id);
            let endpoint =
                endpoint_id.and_then(|id| state.endpoints.iter().find(|e| e.id == id).cloned());
            let Some(row) = state.rows[n].as_mut() else {
                continue;
            };
            row.claim = Some(take.claim);
            row.next_attempt_at = later(now, take.lease);
            claimed.push(Claimed {
                id: row.planned.id,
                channel: row.planned.channel,
                target: row.planned.target.clone(),
                endpoint,
                message_id: row.planned.message_id.clone(),
                payload: row.planned.payload.clone(),
                attempts: row.attempts,
                claim: take.claim,
            });
        }
        Ok(claimed)
    }

    async fn finish(&self, id: Uuid, claim: Uuid, finish: &Finish) -> StoreResult<bool> {
        let mut state = self.state();
        let now = Utc::now();
        let mut recorded = false;
        if let Some(row) = state.row_mut(id) {
            if row.claim == Some(claim) && row.status == "pending" {
                row.status = finish.status;
                row.attempts += 1;
                row.last_status_code = finish.status_code;
                row.last_error = finish.error.clone();
                row.claim = None;
                if let Some(wait) = finish.retry_in {
                    row.next_attempt_at = later(now, wait);
                }
                if finish.status == "delivered" {
                    row.delivered_at = Some(now);
                }
                recorded = true;
            }
        }
        // The receiver's 410 disables its endpoint, recorded or not.
        if let Some(endpoint) = finish.disable {
            if let Some(e) = state.endpoints.iter_mut().find(|e| e.id == endpoint) {
                e.status = "disabled".into();
            }
            for row in state.rows.iter_mut().flatten() {
                if row.planned.endpoint_id == Some(endpoint) && row.status == "pending" {
                    row.status = "failed";
                    row.last_error = Some("the endpoint is disabled (410 Gone)".into());
                    row.claim = None;
                }
            }
        }
        Ok(recorded)
    }

    async fn deliveries(
        &self,
        filter: &DeliveryFilter,
        limit: usize,
        before: Option<i64>,
    ) -> StoreResult<Vec<DeliveryView>> {
        let state = self.state();
        let end = before.map_or(i64::MAX, |b| b);
        Ok(state
            .live()
            .rev()
            .filter(|(n, row)| {
                i64::try_from(*n).unwrap_or(i64::MAX) < end
                    && filter
                        .endpoint
                        .is_none_or(|e| row.planned.endpoint_id == Some(e))
                    && filter.channel.is_none_or(|c| row.planned.channel == c)
                    && filter.status.as_deref().is_none_or(|s| row.status == s)
            })
            .take(limit)
            .map(|(n, row)| DeliveryView {
                id: row.planned.id,
                channel: row.planned.channel.as_str(),
                target: row.planned.target.clone(),
                event: row.planned.event.clone(),
                status: row.status.to_string(),
                attempts: row.attempts,
                last_status_code: row.last_status_code,
                last_error: row.last_error.clone(),
                next_attempt_at: (row.status == "pending").then_some(row.next_attempt_at),
                delivered_at: row.delivered_at,
                n: i64::try_from(n).unwrap_or(i64::MAX),
            })
            .collect())
    }

    async fn retry(&self, id: Uuid) -> StoreResult<Retry> {
        let mut state = self.state();
        let Some(&n) = state.ids.get(&id) else {
            return Ok(Retry::NoSuchDelivery);
        };
        let Some(endpoint_id) = state.rows[n].as_ref().map(|r| r.planned.endpoint_id) else {
            return Ok(Retry::NoSuchDelivery);
        };
        let disabled =
            endpoint_id.is_some_and(|id| state.endpoints.iter().any(|e| e.id == id && !e.active()));
        let Some(row) = state.rows[n].as_mut() else {
            return Ok(Retry::NoSuchDelivery);
        };
        if row.status != "failed" {
            return Ok(Retry::NotFailed);
        }
        if disabled {
            return Ok(Retry::EndpointDisabled);
        }
        row.status = "pending";
        row.attempts = 0;
        row.next_attempt_at = Utc::now();
        row.claim = None;
        Ok(Retry::Retried)
    }

    async fn intake_mark(&self, channel: Channel) -> StoreResult<Option<u64>> {
        Ok(self.state().marks.get(&channel).copied())
    }

    async fn begin_intake(&self, channel: Channel, seq: u64) -> StoreResult<()> {
        self.state().marks.entry(channel).or_insert(seq);
        Ok(())
    }

    async fn note_intake(&self, channel: Channel, seq: u64) -> StoreResult<()> {
        let mut state = self.state();
        let mark = state.marks.entry(channel).or_default();
        *mark = (*mark).max(seq);
        Ok(())
    }

    async fn backlog(&self) -> StoreResult<HashMap<Channel, Backlog>> {
        let state = self.state();
        let now = Utc::now();
        let mut backlog: HashMap<Channel, Backlog> = HashMap::new();
        for (_, row) in state.live().filter(|(_, r)| r.status == "pending") {
            let figures = backlog.entry(row.planned.channel).or_default();
            figures.pending += 1;
            let age = (now - row.created_at).num_milliseconds() as f64 / 1000.0;
            figures.oldest_secs = figures.oldest_secs.max(age);
        }
        Ok(backlog)
    }

    async fn purge(&self, before: DateTime<Utc>) -> StoreResult<u64> {
        let purged = self
            .state()
            .remove(|row| row.status != "pending" && row.created_at < before);
        Ok(purged as u64)
    }
}
