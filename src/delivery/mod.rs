//! Delivery channels: notifications by email over SMTP, and events to
//! webhook endpoints signed as the Standard Webhooks specification says.
//!
//! Two stages, on every instance:
//! - **Intake** turns events into delivery rows: one per (event, address)
//!   for email, one per (event, endpoint) for webhooks, with ids derived from
//!   both, so recording one twice records it once. In production each
//!   channel has one durable JetStream consumer that every instance pulls
//!   from ([`intake`]): an event goes to one instance, is acknowledged once
//!   its rows are recorded, and is handed to another if that instance dies
//!   first. The single node without NATS and the embedded mode hand their
//!   events to the same [`Deliveries::intake`].
//! - **Dispatch** sends what is due ([`Deliveries::dispatch`]): each instance
//!   takes up to its concurrency of due rows, personal before bulk, by moving
//!   their next attempt a lease ahead (a taker that dies gives them back when
//!   the lease runs out), sends, and records the outcome under its claim
//!   before anything else happens. Retries wait as the channel's schedule
//!   says; after its last wait, or at once for a permanent refusal (SMTP 5xx,
//!   a webhook's 410), the delivery is `failed`.
//!
//! Why rows and not JetStream's own redelivery for the retries: a message
//! negatively acknowledged with a delay still counts against the consumer's
//! `max_ack_pending`, so one webhook receiver down for the ten hours of its
//! schedule would stop every other one; and a consumer has no priority
//! between its messages, so an announcement to 10,000 users would hold up a
//! personal best behind it. The rows also are the per-endpoint delivery log
//! the API shows.
//!
//! May use `ops` and `config`.

pub mod email;
pub mod intake;
pub mod memory;
pub mod plan;
pub mod postgres;
pub mod webhook;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::FutureExt;
use podium_domain::log::RecordedEvent;
use serde::Serialize;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::config::{DeliverySettings, Schedule};
use crate::ops::metrics::{Metrics, Probe};
pub use plan::{Planned, WEBHOOK_EVENTS};

/// The two channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    Email,
    Webhook,
}

impl Channel {
    pub const ALL: [Self; 2] = [Self::Email, Self::Webhook];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Email => "email",
            Self::Webhook => "webhook",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == raw)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The notification kinds a user may choose to get by email.
pub const EMAIL_KINDS: [&str; 5] = [
    "attempt_graded",
    "personal_best",
    "rank_overtaken",
    "period_podium",
    "announcement",
];

/// The kinds emailed to a user who never chose.
pub const DEFAULT_EMAIL_KINDS: [&str; 4] = [
    "personal_best",
    "rank_overtaken",
    "period_podium",
    "announcement",
];

/// A user's email settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct EmailSettings {
    /// Where their emails go; none are sent without one.
    pub email: Option<String>,
    /// The notification kinds they get by email.
    pub email_kinds: Vec<String>,
}

impl Default for EmailSettings {
    fn default() -> Self {
        Self {
            email: None,
            email_kinds: DEFAULT_EMAIL_KINDS.map(String::from).to_vec(),
        }
    }
}

/// A webhook endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    /// `whsec_` and the base64 of the signing key.
    pub secret: String,
    /// `active`, or `disabled` once its receiver answered 410.
    pub status: String,
    pub created_at: DateTime<Utc>,
}

impl Endpoint {
    pub fn active(&self) -> bool {
        self.status == "active"
    }

    /// Whether it gets events of type `kind` (an empty list: every type).
    pub fn wants(&self, kind: &str) -> bool {
        self.events.is_empty() || self.events.iter().any(|t| t == kind)
    }
}

/// What the channels can record deliveries of at one moment
/// ([`Deliveries::interest`]).
pub struct Interest {
    /// Emails of notifications (an SMTP server is configured).
    email: bool,
    /// The active webhook endpoints.
    endpoints: Vec<Endpoint>,
}

impl Interest {
    /// Whether an event of this type can record a delivery. Intake passes
    /// the others over without decoding them.
    pub fn wants(&self, aggregate_type: &str, event_type: &str) -> bool {
        (self.email && plan::emailed(aggregate_type, event_type))
            || plan::webhook_kind(aggregate_type, event_type)
                .is_some_and(|kind| self.endpoints.iter().any(|e| e.wants(kind)))
    }
}

/// A delivery taken to be sent.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: Uuid,
    pub channel: Channel,
    pub target: String,
    /// The endpoint, for a webhook (`None` if it was deleted meanwhile).
    pub endpoint: Option<Endpoint>,
    pub message_id: String,
    pub payload: serde_json::Value,
    /// Tries before this one.
    pub attempts: u32,
    /// Under which it was taken: the outcome is recorded only under it.
    pub claim: Uuid,
}

/// How a try ended, as the channel tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered {
        status_code: Option<u16>,
    },
    /// Worth trying again later (connection refused, SMTP 4xx, a webhook's
    /// 5xx or timeout).
    Temporary {
        status_code: Option<u16>,
        error: String,
    },
    /// Never worth trying again (SMTP 5xx, a malformed address).
    Permanent {
        status_code: Option<u16>,
        error: String,
    },
    /// The webhook receiver answered 410: the endpoint is disabled.
    Gone,
}

/// What is recorded after a try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    /// `delivered`, `pending` (another try after `retry_in`) or `failed`.
    pub status: &'static str,
    pub retry_in: Option<Duration>,
    pub status_code: Option<u16>,
    pub error: Option<String>,
    /// The endpoint to disable (its receiver answered 410).
    pub disable: Option<Uuid>,
}

impl Finish {
    /// What `outcome` of try number `attempts` means under `schedule`.
    pub fn of(
        outcome: Outcome,
        attempts: u32,
        schedule: &Schedule,
        endpoint: Option<Uuid>,
    ) -> Self {
        match outcome {
            Outcome::Delivered { status_code } => Self {
                status: "delivered",
                retry_in: None,
                status_code,
                error: None,
                disable: None,
            },
            Outcome::Temporary { status_code, error } => match schedule.after(attempts) {
                Some(wait) => Self {
                    status: "pending",
                    retry_in: Some(wait),
                    status_code,
                    error: Some(error),
                    disable: None,
                },
                None => Self {
                    status: "failed",
                    retry_in: None,
                    status_code,
                    error: Some(format!("gave up after {attempts} tries: {error}")),
                    disable: None,
                },
            },
            Outcome::Permanent { status_code, error } => Self {
                status: "failed",
                retry_in: None,
                status_code,
                error: Some(error),
                disable: None,
            },
            Outcome::Gone => Self {
                status: "failed",
                retry_in: None,
                status_code: Some(410),
                error: Some("the receiver answered 410 Gone: endpoint disabled".into()),
                disable: endpoint,
            },
        }
    }

    /// The metrics' name for it.
    fn outcome(&self) -> &'static str {
        match (self.status, self.disable) {
            ("delivered", _) => "delivered",
            ("pending", _) => "retried",
            (_, Some(_)) => "disabled",
            _ => "failed",
        }
    }
}

/// Which deliveries a listing shows.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub endpoint: Option<Uuid>,
    pub channel: Option<Channel>,
    /// `pending`, `delivered` or `failed`.
    pub status: Option<String>,
}

/// A delivery as the delivery log shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeliveryView {
    pub id: Uuid,
    /// `email` or `webhook`.
    pub channel: &'static str,
    /// The address, or the endpoint's id.
    pub target: String,
    /// The webhook event type (or the notification's kind, for email).
    pub event: String,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    pub attempts: u32,
    pub last_status_code: Option<u16>,
    pub last_error: Option<String>,
    /// When it is tried next, while pending.
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    /// Where the page after this one starts.
    #[serde(skip)]
    pub n: i64,
}

/// Which due deliveries a dispatcher takes.
#[derive(Debug, Clone)]
pub struct Take<'a> {
    pub channel: Channel,
    /// [`plan::PERSONAL`] or [`plan::BULK`].
    pub priority: i16,
    pub claim: Uuid,
    pub lease: Duration,
    pub limit: usize,
    /// Endpoints with as many sends in flight on this instance as they may
    /// have: none of theirs is taken.
    pub skip_endpoints: &'a [Uuid],
}

/// Due deliveries of `channel`, personal first, up to `limit`.
pub async fn take_due(
    store: &dyn DeliveryStore,
    channel: Channel,
    claim: Uuid,
    lease: Duration,
    limit: usize,
    skip_endpoints: &[Uuid],
) -> StoreResult<Vec<Claimed>> {
    let mut taken = Vec::new();
    for priority in [plan::PERSONAL, plan::BULK] {
        let left = limit - taken.len();
        if left == 0 {
            break;
        }
        let take = Take {
            channel,
            priority,
            claim,
            lease,
            limit: left,
            skip_endpoints,
        };
        taken.extend(store.claim(&take).await?);
    }
    Ok(taken)
}

/// What asking to send a delivery again did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    Retried,
    NoSuchDelivery,
    /// It is pending or delivered.
    NotFailed,
    /// Its endpoint answered 410 since.
    EndpointDisabled,
}

/// The pending deliveries of a channel.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Backlog {
    pub pending: i64,
    /// Age of the oldest pending delivery, in seconds.
    pub oldest_secs: f64,
}

pub type StoreResult<T> = Result<T, sqlx::Error>;

/// Where settings, endpoints and deliveries are kept: Postgres, or memory
/// in the embedded mode.
#[async_trait::async_trait]
pub trait DeliveryStore: Send + Sync {
    /// The settings of those of `users` who have any.
    async fn email_settings(&self, users: &[&str]) -> StoreResult<HashMap<String, EmailSettings>>;
    async fn put_email_settings(&self, user: &str, settings: &EmailSettings) -> StoreResult<()>;
    async fn create_endpoint(&self, endpoint: &Endpoint) -> StoreResult<()>;
    /// Every endpoint, oldest first.
    async fn endpoints(&self) -> StoreResult<Vec<Endpoint>>;
    /// Whether it existed.
    async fn delete_endpoint(&self, id: Uuid) -> StoreResult<bool>;
    /// Records what is not recorded yet; returns how many were new.
    async fn record(&self, planned: &[Planned]) -> StoreResult<u64>;
    /// Takes up to `take.limit` due deliveries of one channel and priority,
    /// oldest due first, for `take.lease`.
    async fn claim(&self, take: &Take<'_>) -> StoreResult<Vec<Claimed>>;
    /// Records how a try of a delivery taken under `claim` ended; nothing if
    /// another instance has taken it since. Returns whether it was recorded.
    async fn finish(&self, id: Uuid, claim: Uuid, finish: &Finish) -> StoreResult<bool>;
    /// The deliveries `filter` picks, newest first, from before `before` (an
    /// earlier page's last `n`).
    async fn deliveries(
        &self,
        filter: &DeliveryFilter,
        limit: usize,
        before: Option<i64>,
    ) -> StoreResult<Vec<DeliveryView>>;
    /// Makes a failed delivery pending again, due now, with its tries
    /// counted afresh, unless it has not failed or its endpoint is disabled.
    async fn retry(&self, id: Uuid) -> StoreResult<Retry>;
    /// The highest log seq `channel`'s intake recorded deliveries for.
    async fn intake_mark(&self, channel: Channel) -> StoreResult<Option<u64>>;
    /// Raises that mark to `seq`.
    async fn note_intake(&self, channel: Channel, seq: u64) -> StoreResult<()>;
    /// Sets that mark to `seq` unless `channel` has one: a deployment's
    /// first start, which delivers the events after it (not the history),
    /// however late its intake's consumer is made.
    async fn begin_intake(&self, channel: Channel, seq: u64) -> StoreResult<()>;
    /// Pending deliveries by channel.
    async fn backlog(&self) -> StoreResult<HashMap<Channel, Backlog>>;
    /// Forgets delivered and failed deliveries recorded before `before`;
    /// returns how many.
    async fn purge(&self, before: DateTime<Utc>) -> StoreResult<u64>;
}

/// How each channel sends.
pub struct Senders {
    /// `None` without `PODIUM_SMTP_URL`: no email is planned.
    pub email: Option<email::Mailer>,
    pub webhooks: webhook::Poster,
}

/// The delivery service of one instance: intake, dispatch, and the store
/// the API reads.
pub struct Deliveries {
    pub store: Arc<dyn DeliveryStore>,
    senders: Senders,
    email_schedule: Schedule,
    webhook_schedule: Schedule,
    concurrency: usize,
    lease: Duration,
    poll: Duration,
    /// Per channel ([`Channel::index`]): rung when this instance recorded
    /// deliveries of it, or finished a send.
    wake: [Notify; 2],
    metrics: Metrics,
}

impl Deliveries {
    pub fn new(
        store: Arc<dyn DeliveryStore>,
        settings: &DeliverySettings,
        metrics: Metrics,
    ) -> anyhow::Result<Arc<Self>> {
        let concurrency = settings.delivery_concurrency.max(1);
        anyhow::ensure!(
            settings.delivery_lease_ms >= 2 * settings.webhook_timeout_ms,
            "PODIUM_DELIVERY_LEASE_MS ({}) must be at least twice PODIUM_WEBHOOK_TIMEOUT_MS ({}): \
             a send is cut off at half the lease, so that no other instance takes it over while \
             it runs",
            settings.delivery_lease_ms,
            settings.webhook_timeout_ms
        );
        let email = settings
            .smtp_url
            .as_ref()
            .map(|url| email::Mailer::new(url.expose(), &settings.email_from, concurrency))
            .transpose()?;
        for channel in Channel::ALL {
            metrics
                .delivery_seconds
                .with_label_values(&[channel.as_str()]);
            for outcome in ["delivered", "retried", "failed"] {
                metrics
                    .deliveries
                    .with_label_values(&[channel.as_str(), outcome]);
            }
        }
        Ok(Arc::new(Self {
            store,
            senders: Senders {
                email,
                webhooks: webhook::Poster::new(Duration::from_millis(settings.webhook_timeout_ms))?,
            },
            email_schedule: settings.email_retry_schedule.clone(),
            webhook_schedule: settings.webhook_retry_schedule.clone(),
            concurrency,
            lease: Duration::from_millis(settings.delivery_lease_ms.max(1)),
            poll: Duration::from_millis(settings.delivery_poll_ms.max(10)),
            wake: [Notify::new(), Notify::new()],
            metrics,
        }))
    }

    /// Makes a failed delivery pending again and sends it soon (see
    /// [`DeliveryStore::retry`]).
    pub async fn retry(&self, id: Uuid) -> StoreResult<Retry> {
        let retried = self.store.retry(id).await?;
        if retried == Retry::Retried {
            for wake in &self.wake {
                wake.notify_one();
            }
        }
        Ok(retried)
    }

    /// Whether emails are sent at all (an SMTP server is configured).
    pub fn emails(&self) -> bool {
        self.senders.email.is_some()
    }

    /// What `channels` can record deliveries of now: emails of
    /// notifications when an SMTP server is configured, and the webhook
    /// types the active endpoints subscribe to.
    pub async fn interest(&self, channels: &[Channel]) -> StoreResult<Interest> {
        let endpoints = if channels.contains(&Channel::Webhook) {
            let mut endpoints = self.store.endpoints().await?;
            endpoints.retain(Endpoint::active);
            endpoints
        } else {
            Vec::new()
        };
        Ok(Interest {
            email: channels.contains(&Channel::Email) && self.emails(),
            endpoints,
        })
    }

    /// Records the deliveries `events` ask for on `channels`, and wakes this
    /// instance's dispatcher.
    pub async fn intake(&self, channels: &[Channel], events: &[RecordedEvent]) -> StoreResult<u64> {
        let interest = self.interest(channels).await?;
        self.intake_with(&interest, events).await
    }

    /// [`Self::intake`] with what the channels record read already. Events
    /// that no channel wants are passed over undecoded; events that ask for
    /// nothing cost no query.
    pub async fn intake_with(
        &self,
        interest: &Interest,
        events: &[RecordedEvent],
    ) -> StoreResult<u64> {
        let decoded: Vec<_> = events
            .iter()
            .filter(|recorded| interest.wants(&recorded.aggregate_type, &recorded.event_type))
            .filter_map(|recorded| match recorded.decode() {
                Ok(event) => Some((recorded, event)),
                Err(err) => {
                    tracing::warn!(seq = recorded.seq, %err, "an event no delivery can read");
                    None
                }
            })
            .collect();
        let mut planned = Vec::new();
        if interest.email {
            let recipients: HashSet<&str> = decoded
                .iter()
                .filter_map(|(_, event)| plan::notice(event))
                .map(|notice| notice.recipient)
                .collect();
            if !recipients.is_empty() {
                let recipients: Vec<&str> = recipients.into_iter().collect();
                let settings = self.store.email_settings(&recipients).await?;
                planned.extend(
                    decoded
                        .iter()
                        .filter_map(|(recorded, event)| plan::email(recorded, event, &settings)),
                );
            }
        }
        for (recorded, event) in &decoded {
            planned.extend(plan::webhooks(recorded, event, &interest.endpoints));
        }
        if planned.is_empty() {
            return Ok(0);
        }
        let recorded = self.store.record(&planned).await?;
        for channel in Channel::ALL {
            if planned.iter().any(|p| p.channel == channel) {
                self.wake[channel.index()].notify_one();
            }
        }
        Ok(recorded)
    }

    /// Sends due deliveries until `stop`: each channel this instance can
    /// send on has its own permits (a webhook receiver that stalls cannot
    /// hold up email), and no endpoint has more than a quarter of them.
    /// Each send is spawned on `tasks`.
    pub async fn dispatch(self: Arc<Self>, tasks: TaskTracker, stop: CancellationToken) {
        let channels = Channel::ALL
            .into_iter()
            .filter(|c| *c != Channel::Email || self.emails());
        futures::future::join_all(channels.map(|channel| {
            self.clone()
                .dispatch_channel(channel, tasks.clone(), stop.clone())
        }))
        .await;
    }

    async fn dispatch_channel(
        self: Arc<Self>,
        channel: Channel,
        tasks: TaskTracker,
        stop: CancellationToken,
    ) {
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let per_endpoint = (self.concurrency / 4).max(1);
        let in_flight: Arc<std::sync::Mutex<HashMap<Uuid, usize>>> = Arc::default();
        let wake = &self.wake[channel.index()];
        let mut failures = 0u32;
        loop {
            let free = permits.available_permits();
            let mut claimed = 0;
            if free > 0 {
                let busy: Vec<Uuid> = lock(&in_flight)
                    .iter()
                    .filter(|(_, n)| **n >= per_endpoint)
                    .map(|(e, _)| *e)
                    .collect();
                let taken = take_due(
                    &*self.store,
                    channel,
                    Uuid::new_v4(),
                    self.lease,
                    free,
                    &busy,
                )
                .await;
                match taken {
                    Ok(batch) => {
                        failures = 0;
                        claimed = batch.len();
                        for delivery in batch {
                            let Ok(permit) = permits.clone().try_acquire_owned() else {
                                break;
                            };
                            let endpoint = delivery.endpoint.as_ref().map(|e| e.id);
                            if let Some(endpoint) = endpoint {
                                *lock(&in_flight).entry(endpoint).or_default() += 1;
                            }
                            let (this, in_flight) = (self.clone(), in_flight.clone());
                            tasks.spawn(async move {
                                this.send(delivery).await;
                                if let Some(endpoint) = endpoint {
                                    let mut in_flight = lock(&in_flight);
                                    if let Some(n) = in_flight.get_mut(&endpoint) {
                                        *n -= 1;
                                        if *n == 0 {
                                            in_flight.remove(&endpoint);
                                        }
                                    }
                                }
                                drop(permit);
                                this.wake[channel.index()].notify_one();
                            });
                        }
                    }
                    Err(err) => {
                        failures = failures.saturating_add(1);
                        tracing::warn!(channel = channel.as_str(), %err, "cannot take due deliveries; will retry");
                    }
                }
            }
            // More may be due at once: look again without waiting.
            if claimed > 0 && claimed == free {
                continue;
            }
            let wait = self.poll * failures.clamp(1, 20);
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// One try of `delivery`, and its outcome recorded.
    async fn send(&self, delivery: Claimed) {
        let channel = delivery.channel;
        let started = std::time::Instant::now();
        let (sending, schedule) = match channel {
            Channel::Email => (
                async {
                    match &self.senders.email {
                        Some(mailer) => mailer.send(&delivery).await,
                        None => Outcome::Temporary {
                            status_code: None,
                            error: "PODIUM_SMTP_URL is not set on this instance".into(),
                        },
                    }
                }
                .boxed(),
                &self.email_schedule,
            ),
            Channel::Webhook => (
                self.senders.webhooks.send(&delivery).boxed(),
                &self.webhook_schedule,
            ),
        };
        // A send never outlives half its lease: past the lease another
        // instance would send the same message.
        let outcome = tokio::time::timeout(self.lease / 2, sending)
            .await
            .unwrap_or_else(|_| Outcome::Temporary {
                status_code: None,
                error: format!(
                    "the send took longer than {:?} (half the lease)",
                    self.lease / 2
                ),
            });
        self.metrics
            .delivery_seconds
            .with_label_values(&[channel.as_str()])
            .observe(started.elapsed().as_secs_f64());
        let endpoint = delivery.endpoint.as_ref().map(|e| e.id);
        let finish = Finish::of(outcome, delivery.attempts + 1, schedule, endpoint);
        if finish.status != "delivered" {
            tracing::info!(
                channel = channel.as_str(),
                id = %delivery.id,
                status = finish.status,
                error = finish.error.as_deref().unwrap_or_default(),
                "a delivery did not go through"
            );
        }
        // Recorded before anything else: a crash from here on sends it again
        // (the one window where a receiver can see a message twice).
        let mut backoff = Duration::from_millis(50);
        loop {
            match self
                .store
                .finish(delivery.id, delivery.claim, &finish)
                .await
            {
                Ok(recorded) => {
                    if recorded {
                        self.metrics
                            .deliveries
                            .with_label_values(&[channel.as_str(), finish.outcome()])
                            .inc();
                    }
                    return;
                }
                // Until the lease runs out the delivery is ours to record.
                Err(err) if backoff < self.lease => {
                    tracing::warn!(%err, "cannot record a delivery's outcome; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(err) => {
                    tracing::error!(%err, id = %delivery.id, "gave up recording a delivery's outcome: it will be sent again");
                    return;
                }
            }
        }
    }
}

impl Deliveries {
    /// What `/metrics` samples: the backlog of each channel. (The probe holds
    /// the store alone: the metrics hold their probes, and the service holds
    /// the metrics.)
    pub fn probe(&self) -> Arc<dyn Probe> {
        Arc::new(BacklogProbe(self.store.clone()))
    }
}

struct BacklogProbe(Arc<dyn DeliveryStore>);

#[async_trait::async_trait]
impl Probe for BacklogProbe {
    async fn sample(&self, metrics: &Metrics) {
        let Ok(backlog) = self.0.backlog().await else {
            return;
        };
        for channel in Channel::ALL {
            let figures = backlog.get(&channel).copied().unwrap_or_default();
            let c = [channel.as_str()];
            metrics
                .delivery_pending
                .with_label_values(&c)
                .set(figures.pending);
            metrics
                .delivery_oldest_pending
                .with_label_values(&c)
                .set(figures.oldest_secs);
        }
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A fresh webhook secret: `whsec_` and 32 random bytes in base64.
pub fn new_secret() -> String {
    use base64::Engine;
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(Uuid::new_v4().as_bytes());
    key[16..].copy_from_slice(Uuid::new_v4().as_bytes());
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_temporary_failure_waits_as_the_schedule_says_then_fails() {
        let schedule: Schedule = "1s,1m".parse().unwrap();
        let temporary = || Outcome::Temporary {
            status_code: Some(503),
            error: "busy".into(),
        };
        let first = Finish::of(temporary(), 1, &schedule, None);
        assert_eq!(
            (first.status, first.retry_in),
            ("pending", Some(Duration::from_secs(1)))
        );
        let second = Finish::of(temporary(), 2, &schedule, None);
        assert_eq!(second.retry_in, Some(Duration::from_secs(60)));
        let third = Finish::of(temporary(), 3, &schedule, None);
        assert_eq!(third.status, "failed");
        assert!(third.error.unwrap().contains("gave up after 3 tries"));
        let permanent = Outcome::Permanent {
            status_code: Some(550),
            error: "no such user".into(),
        };
        assert_eq!(Finish::of(permanent, 1, &schedule, None).status, "failed");
        let endpoint = Uuid::from_u128(1);
        let gone = Finish::of(Outcome::Gone, 1, &schedule, Some(endpoint));
        assert_eq!((gone.status, gone.disable), ("failed", Some(endpoint)));
        assert_eq!(gone.outcome(), "disabled");
    }

    #[test]
    fn intake_decodes_only_events_a_channel_can_send_now() {
        const TYPES: [(&str, &str); 5] = [
            ("Attempt", "AttemptStarted"),
            ("Attempt", "AttemptSubmitted"),
            ("Notification", "NotificationCreated"),
            ("Notification", "NotificationRead"),
            ("Test", "TestPublished"),
        ];
        let endpoint = |events: &[&str], status: &str| Endpoint {
            id: Uuid::from_u128(1),
            url: "http://127.0.0.1:9/hook".into(),
            events: events.iter().map(|e| e.to_string()).collect(),
            secret: new_secret(),
            status: status.into(),
            created_at: Utc::now(),
        };
        let wanted = |interest: &Interest| -> Vec<&str> {
            TYPES
                .iter()
                .filter(|(aggregate, event)| interest.wants(aggregate, event))
                .map(|(_, event)| *event)
                .collect()
        };
        let nothing = Interest {
            email: false,
            endpoints: Vec::new(),
        };
        assert!(wanted(&nothing).is_empty());
        let email = Interest {
            email: true,
            endpoints: Vec::new(),
        };
        assert_eq!(wanted(&email), ["NotificationCreated"]);
        let every_type = Interest {
            email: false,
            endpoints: vec![endpoint(&[], "active")],
        };
        assert_eq!(
            wanted(&every_type),
            ["AttemptSubmitted", "NotificationCreated", "TestPublished"]
        );
        let tests_only = Interest {
            email: false,
            endpoints: vec![endpoint(&["test.published"], "active")],
        };
        assert_eq!(wanted(&tests_only), ["TestPublished"]);
        // Every webhook type of the contract is read off some event type.
        for kind in WEBHOOK_EVENTS {
            assert!(
                TYPES
                    .iter()
                    .any(|(a, e)| plan::webhook_kind(a, e) == Some(kind)),
                "{kind}"
            );
        }
    }

    #[test]
    fn a_secret_is_whsec_and_32_random_bytes() {
        use base64::Engine;
        let (a, b) = (new_secret(), new_secret());
        assert_ne!(a, b);
        let key = base64::engine::general_purpose::STANDARD
            .decode(a.strip_prefix("whsec_").unwrap())
            .unwrap();
        assert_eq!(key.len(), 32);
    }
}
