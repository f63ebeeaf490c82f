//! Intake in production: one durable JetStream consumer per channel on the
//! events stream, pulled by every instance. Each event goes to one instance
//! at a time; it is acknowledged once its deliveries are recorded, and
//! JetStream hands it to another instance if that one dies first (recording
//! it again records nothing new). Every consumer starts after the last
//! event its channel took in, which Postgres keeps (at once for events
//! that recorded deliveries, within a second for the others): on a deployment's first
//! start, the events the relay had numbered by then (history is not mailed
//! out when delivery is deployed, and the first requests' events are not
//! missed however late the consumer is made); after its stream or itself
//! was deleted, where it stopped.
//!
//! While no active endpoint exists, the webhook channel (whose consumer
//! takes every event of the log) holds no consumer open: it looks for an
//! endpoint four times a second and moves its mark to the last event on the
//! stream, read before each look. Once one is there, its consumer is made
//! again after that mark, so the endpoint gets every event after the last
//! look that found none, and NATS delivered and took acknowledgements for
//! none of the events before it (a third of the CPU of a relay working off
//! a backlog, in `podium-bench backlog --only relay`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::AckKind;
use futures::{FutureExt, StreamExt};
use podium_domain::log::RecordedEvent;
use podium_nats::{EventBus, StreamPosition};
use tokio_util::sync::CancellationToken;

use super::{Channel, Deliveries, StoreResult};

/// Most events recorded in one statement.
const BATCH: usize = 500;
/// How long an instance may hold an event before JetStream hands it to another.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// The wait before an event whose deliveries could not be recorded comes back.
const RETRY: Duration = Duration::from_secs(1);
/// How often the last event taken in is written down when the events
/// taken in recorded no delivery (a statement and a commit per batch, one
/// batch per few events while the log is written). A batch that recorded
/// deliveries writes it at once: once those are sent and purged, the mark
/// alone keeps a consumer made again from sending them twice. Events that
/// recorded nothing, taken in twice, record nothing again.
const MARK_EVERY: Duration = Duration::from_secs(1);

/// How often a webhook intake without endpoints looks for one.
const IDLE_LOOK: Duration = Duration::from_millis(250);

/// The consumer's name on the events stream.
pub fn consumer_name(channel: Channel) -> String {
    format!("delivery-{}", channel.as_str())
}

/// Pulls `channel`'s events until `stop`, recording their deliveries;
/// re-creates the consumer (or waits for the stream) whenever it is gone.
pub async fn run(
    deliveries: Arc<Deliveries>,
    bus: EventBus,
    channel: Channel,
    max_ack_pending: i64,
    stop: CancellationToken,
) {
    let mut backoff = podium_nats::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        if channel == Channel::Webhook && !until_wanted(&deliveries, &bus, &stop).await {
            return;
        }
        match pull_until_broken(&deliveries, &bus, channel, max_ack_pending, &stop).await {
            Ok(Pulled::Stopped) => return,
            Ok(Pulled::Unwanted) => {}
            Err(err) => {
                tracing::warn!(channel = channel.as_str(), %err, "delivery intake interrupted; reconnecting");
                if backoff.wait(&stop).await {
                    return;
                }
            }
        }
    }
}

/// Waits while no active webhook endpoint exists, and returns whether the
/// intake goes on (`false`: stopped). Each look first reads the last event
/// on the stream, then the endpoints: when there are none, everything up to
/// that event is marked taken in, as nothing read before that look can want
/// it. If it waited, the consumer is deleted, so that it is made again
/// after the mark instead of after whatever it took in before.
async fn until_wanted(deliveries: &Deliveries, bus: &EventBus, stop: &CancellationToken) -> bool {
    let mut waited = false;
    // The mark this instance wrote last: written again only once the
    // stream has grown, not four times a second for as long as it waits.
    let mut marked = None;
    loop {
        let last = bus.last_log_seq().await;
        match deliveries.interest(&[Channel::Webhook]).await {
            Ok(interest) if interest.endpoints.is_empty() => {
                match last {
                    Ok(Some(seq)) if marked < Some(seq) => {
                        match deliveries.store.note_intake(Channel::Webhook, seq).await {
                            Ok(()) => marked = Some(seq),
                            Err(err) => {
                                tracing::warn!(%err, "cannot write the webhook intake's mark")
                            }
                        }
                    }
                    _ => {}
                }
                waited = true;
            }
            // An endpoint, or no telling: the consumer decides event by event.
            _ => break,
        }
        if podium_nats::stopped_during(IDLE_LOOK, stop).await {
            return false;
        }
    }
    if waited {
        let name = consumer_name(Channel::Webhook);
        if let Ok(stream) = bus.events_stream().await {
            // Gone already (another instance was first) is as good.
            let _ = stream.delete_consumer(&name).await;
        }
    }
    true
}

/// Why [`pull_until_broken`] stopped pulling without an error.
enum Pulled {
    Stopped,
    /// The webhook channel has no active endpoint any more.
    Unwanted,
}

/// Where a consumer made afresh starts, and the last event taken in before
/// it: after that event (the stream, or the consumer alone, was deleted and
/// made again), or at the next event when delivery is new here (history is
/// not sent).
async fn start(
    deliveries: &Deliveries,
    bus: &EventBus,
    channel: Channel,
) -> Result<(DeliverPolicy, u64), String> {
    let Some(mark) = deliveries
        .store
        .intake_mark(channel)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok((DeliverPolicy::New, 0));
    };
    let policy = match bus.position_of(mark + 1).await.map_err(|e| e.to_string())? {
        StreamPosition::At(start_sequence) | StreamPosition::Await(start_sequence) => {
            DeliverPolicy::ByStartSequence { start_sequence }
        }
        StreamPosition::Missing { wanted, first_kept } => {
            tracing::warn!(
                channel = channel.as_str(),
                wanted,
                first_kept,
                "the events stream no longer holds every event after the last one delivery took in; \
                 delivery resumes at the oldest it holds"
            );
            DeliverPolicy::All
        }
    };
    Ok((policy, mark))
}

/// The intake's mark as this consumer keeps it: what it took in and has
/// not written down yet, and when it last tried.
#[derive(Default)]
struct Mark {
    tried: Option<Instant>,
    pending: Option<u64>,
}

impl Mark {
    /// Events up to `last` were taken in.
    fn took_in(&mut self, last: u64) {
        self.pending = Some(self.pending.map_or(last, |p| p.max(last)));
    }

    /// Whether [`MARK_EVERY`] has passed since the last try.
    fn due(&self) -> bool {
        self.tried.is_none_or(|at| at.elapsed() >= MARK_EVERY)
    }

    /// Ready once the mark is due (selected only while one is pending).
    async fn until_due(&self) {
        if let Some(at) = self.tried {
            tokio::time::sleep_until((at + MARK_EVERY).into()).await;
        }
    }

    /// Writes down what is pending; tried again when due if it fails.
    async fn write(&mut self, deliveries: &Deliveries, channel: Channel) -> StoreResult<()> {
        let Some(last) = self.pending else {
            return Ok(());
        };
        self.tried = Some(Instant::now());
        deliveries.store.note_intake(channel, last).await?;
        self.pending = None;
        Ok(())
    }
}

/// `Ok` when stopped, or when the webhook channel has no endpoint left
/// (its last batch taken in); `Err` when the consumer or its messages
/// broke off.
async fn pull_until_broken(
    deliveries: &Deliveries,
    bus: &EventBus,
    channel: Channel,
    max_ack_pending: i64,
    stop: &CancellationToken,
) -> Result<Pulled, String> {
    let stream = bus.events_stream().await.map_err(|e| e.to_string())?;
    let filter_subject = match channel {
        Channel::Email => {
            let (aggregate_type, event_type) = super::plan::EMAILED;
            bus.subjects().event(aggregate_type, event_type)
        }
        Channel::Webhook => bus.subjects().all_events(),
    };
    let name = consumer_name(channel);
    // Events at or below this were taken in by a consumer before this one.
    let mut taken_in = 0;
    let consumer = match stream.get_consumer::<pull::Config>(&name).await {
        Ok(consumer) => consumer,
        // Gone (or never made): made again after the last event taken in.
        Err(_) => {
            let (deliver_policy, mark) = start(deliveries, bus, channel).await?;
            taken_in = mark;
            stream
                .create_consumer(pull::Config {
                    durable_name: Some(name.clone()),
                    description: Some(format!("Podium's {} deliveries: intake", channel.as_str())),
                    filter_subject,
                    deliver_policy,
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: ACK_WAIT,
                    max_ack_pending,
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("cannot create consumer {name}: {e}"))?
        }
    };
    let mut mark = Mark::default();
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("cannot pull from {name}: {e}"))?;
    loop {
        let first = tokio::select! {
            next = messages.next() => next,
            () = stop.cancelled() => return Ok(Pulled::Stopped),
            // Quiet now: the mark catches up with what was taken in.
            () = mark.until_due(), if mark.pending.is_some() => {
                if let Err(err) = mark.write(deliveries, channel).await {
                    tracing::warn!(channel = channel.as_str(), %err, "cannot write the intake mark");
                }
                continue;
            }
        };
        let mut batch = match first {
            Some(Ok(message)) => vec![message],
            Some(Err(err)) => return Err(err.to_string()),
            None => return Err("the consumer's messages ended".into()),
        };
        // Whatever else is here already joins this batch.
        while batch.len() < BATCH {
            match messages.next().now_or_never() {
                Some(Some(Ok(message))) => batch.push(message),
                _ => break,
            }
        }
        // What the channel records now: events it cannot use (for webhooks
        // that no endpoint subscribes to, most of the log) are passed over
        // without decoding, read off their subjects.
        let interest = deliveries.interest(&[channel]).await;
        let unwanted =
            channel == Channel::Webhook && interest.as_ref().is_ok_and(|i| i.endpoints.is_empty());
        let mut events = Vec::with_capacity(batch.len());
        let mut readable = Vec::with_capacity(batch.len());
        // The last event this batch takes in.
        let mut last = None;
        for message in batch {
            if let (Ok(interest), Some((seq, aggregate_type, event_type))) =
                (&interest, bus.kind_of(&message))
            {
                if !interest.wants(aggregate_type, event_type) {
                    last = last.max(Some(seq));
                    readable.push(message);
                    continue;
                }
            }
            match serde_json::from_slice::<RecordedEvent>(&message.payload) {
                // A stream being filled again from the log may still hand
                // out events from before the start position found.
                Ok(event) if event.seq <= taken_in => {
                    let _ = message.ack().await;
                }
                Ok(event) => {
                    last = last.max(Some(event.seq));
                    events.push(event);
                    readable.push(message);
                }
                Err(err) => {
                    tracing::warn!(subject = %message.subject, %err, "not an event: skipped by delivery");
                    let _ = message.ack_with(AckKind::Term).await;
                }
            }
        }
        let recorded = async {
            let recorded = deliveries.intake_with(&interest?, &events).await?;
            if let Some(last) = last {
                mark.took_in(last);
            }
            if recorded > 0 || mark.due() {
                mark.write(deliveries, channel).await?;
            }
            StoreResult::Ok(())
        };
        match recorded.await {
            Ok(()) => {
                for message in readable {
                    // A lost ack only means the event comes back, and is
                    // recorded as nothing new.
                    let _ = message.ack().await;
                }
            }
            Err(err) => {
                tracing::warn!(channel = channel.as_str(), %err, "cannot record deliveries; the events come back");
                for message in readable {
                    let _ = message.ack_with(AckKind::Nak(Some(RETRY))).await;
                }
                if podium_nats::stopped_during(RETRY, stop).await {
                    return Ok(Pulled::Stopped);
                }
            }
        }
        if unwanted {
            return Ok(Pulled::Unwanted);
        }
    }
}
