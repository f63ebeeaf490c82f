//! Each API instance's one subscription to the projections' "changed"
//! notifications (`<prefix>.changed.>`), routed to the instance's own
//! subscribers — the SSE writers and the rank index — and remembered as
//! per-key versions for the query cache. One NATS subscription serves any
//! number of clients.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use podium_domain::log::Change;
use podium_nats::EventBus;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

/// A topic (`leaderboard`, `feed`) and a key in it (a test id, a user id).
type TopicKey = (String, String);

/// A change as handed to subscribers, with its SSE text rendered once for
/// all of them.
pub struct Delivered {
    pub change: Change,
    /// Changes of this key were lost before this one (its predecessor is not
    /// the last one the hub saw): subscribers catch up from the read model.
    pub gap: bool,
    /// It came after a newer change of its key (an owner handing over):
    /// subscribers that sent the newer one cannot place it.
    pub late: bool,
    rendered: OnceLock<Bytes>,
}

impl Delivered {
    /// The change's SSE text, rendered by `render` for the first caller.
    pub fn events(&self, render: impl FnOnce(&Change) -> Bytes) -> &Bytes {
        self.rendered.get_or_init(|| render(&self.change))
    }
}

/// Where a subscriber that reads many keys at once (an SSE writer) takes
/// every change of the keys it forwards.
pub type Sink = mpsc::UnboundedSender<Arc<Delivered>>;

/// One key's subscribers, and the seq of the last change they were handed.
struct Channel {
    sender: broadcast::Sender<Arc<Delivered>>,
    /// Sinks forwarded this key, by their owner's id.
    sinks: Vec<(usize, Sink)>,
    /// 0 until the first change since the channel opened.
    last: u64,
}

impl Channel {
    fn new(buffer: usize) -> Self {
        Self {
            sender: broadcast::channel(buffer).0,
            sinks: Vec::new(),
            last: 0,
        }
    }

    /// Whether nothing but `receivers` receivers listen any more.
    fn unheard(&self, receivers: usize) -> bool {
        self.sinks.is_empty() && self.sender.receiver_count() <= receivers
    }
}

/// Routes change notifications to local subscribers.
pub struct ChangeHub {
    /// One broadcast channel per key that has subscribers; each subscriber
    /// reads at its own pace from the shared buffer.
    channels: Mutex<HashMap<TopicKey, Channel>>,
    /// Messages each channel buffers for its slowest subscriber.
    buffer: usize,
    /// The seq of the last change seen per key, for as long as cached reads
    /// can live: a cached read older than its key's version is stale.
    versions: moka::sync::Cache<TopicKey, u64>,
    /// Moves whenever notifications may have been lost (the NATS connection
    /// was re-established): versions are unknown then, and subscribers catch
    /// up from the read models.
    epoch: watch::Sender<u64>,
}

impl ChangeHub {
    /// `buffer`: changes a slow subscriber may fall behind before it must
    /// catch up from the read model; `remember`: how long a key's version is
    /// kept (at least as long as anything cached from it).
    pub fn new(buffer: usize, remember: Duration) -> Arc<Self> {
        Arc::new(Self {
            channels: Mutex::new(HashMap::new()),
            buffer: buffer.max(1),
            versions: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(remember)
                .build(),
            epoch: watch::channel(0).0,
        })
    }

    /// Changes of `topic`/`key` from now on.
    pub fn subscribe(self: &Arc<Self>, topic: &str, key: &str) -> Subscription {
        let key = (topic.to_string(), key.to_string());
        let mut channels = self
            .channels
            .lock()
            .expect("the hub's lock is never poisoned");
        let changes = channels
            .entry(key.clone())
            .or_insert_with(|| Channel::new(self.buffer))
            .sender
            .subscribe();
        Subscription {
            changes,
            hub: self.clone(),
            key,
        }
    }

    /// Hands every change of `topic`/`key` from now on to `sink`, as the
    /// sink of owner `owner`, until [`unforward`](Self::unforward).
    pub fn forward(&self, topic: &str, key: &str, owner: usize, sink: Sink) {
        let mut channels = self
            .channels
            .lock()
            .expect("the hub's lock is never poisoned");
        let channel = channels
            .entry((topic.to_string(), key.to_string()))
            .or_insert_with(|| Channel::new(self.buffer));
        channel.sinks.retain(|(id, _)| *id != owner);
        channel.sinks.push((owner, sink));
    }

    /// Stops handing `topic`/`key`'s changes to owner `owner`'s sink.
    pub fn unforward(&self, topic: &str, key: &str, owner: usize) {
        let mut channels = self
            .channels
            .lock()
            .expect("the hub's lock is never poisoned");
        let key = (topic.to_string(), key.to_string());
        if let Some(channel) = channels.get_mut(&key) {
            channel.sinks.retain(|(id, _)| *id != owner);
            if channel.unheard(0) {
                channels.remove(&key);
            }
        }
    }

    /// Records `change` and hands it to the subscribers of its key, telling
    /// them when the change its publisher announced before it never arrived.
    pub fn deliver(&self, change: Change) {
        let key = (change.topic.clone(), change.key.clone());
        self.raise_version(key.clone(), change.seq);
        let mut channels = self
            .channels
            .lock()
            .expect("the hub's lock is never poisoned");
        if let Some(channel) = channels.get_mut(&key) {
            let gap = channel.last > 0 && change.prev.is_some_and(|prev| prev > channel.last);
            let late = change.seq < channel.last;
            channel.last = channel.last.max(change.seq);
            let delivered = Arc::new(Delivered {
                change,
                gap,
                late,
                rendered: OnceLock::new(),
            });
            for (_, sink) in &channel.sinks {
                // A sink whose owner has stopped is dropped with its key.
                let _ = sink.send(delivered.clone());
            }
            // No receivers left is fine: the last one is unsubscribing.
            let _ = channel.sender.send(delivered);
        }
    }

    /// Notes that what was read of `topic`/`key` before seq `seq` is stale.
    pub fn mark_stale(&self, topic: &str, key: &str, seq: u64) {
        self.raise_version((topic.to_string(), key.to_string()), seq);
    }

    fn raise_version(&self, key: TopicKey, seq: u64) {
        self.versions
            .entry(key)
            .and_upsert_with(|current| current.map_or(seq, |v| v.into_value().max(seq)));
    }

    /// The seq of the last change seen for `topic`/`key` (0: none lately).
    pub fn version(&self, topic: &str, key: &str) -> u64 {
        self.versions
            .get(&(topic.to_string(), key.to_string()))
            .unwrap_or(0)
    }

    /// Changes whenever notifications may have been lost.
    pub fn epoch(&self) -> u64 {
        *self.epoch.borrow()
    }

    pub fn epochs(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    /// Notifications may have been lost: forget versions, wake subscribers.
    pub fn mark_lost(&self) {
        self.versions.invalidate_all();
        self.epoch.send_modify(|n| *n += 1);
    }

    /// Feeds the hub from `bus` until `stop`: one subscription to every
    /// change notification; when the connection comes back after a loss, or
    /// the subscription ends, subscribers are told to catch up.
    pub async fn listen(self: Arc<Self>, bus: EventBus, stop: CancellationToken) {
        let mut connections = bus.connections();
        loop {
            let mut subscriber = match bus.subscribe_changes().await {
                Ok(subscriber) => subscriber,
                Err(err) => {
                    tracing::warn!(%err, "cannot subscribe to change notifications; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        () = stop.cancelled() => return,
                    }
                }
            };
            loop {
                tokio::select! {
                    message = subscriber.next() => match message {
                        Some(message) => match serde_json::from_slice::<Change>(&message.payload) {
                            Ok(change) => self.deliver(change),
                            Err(err) => tracing::warn!(%err, "ignoring a malformed change notification"),
                        },
                        None => break,
                    },
                    changed = connections.changed() => {
                        if changed.is_err() {
                            // The bus is gone; only the stop signal is left to wait for.
                            stop.cancelled().await;
                            return;
                        }
                        tracing::info!("NATS connection re-established; subscribers catch up");
                        self.mark_lost();
                    }
                    () = stop.cancelled() => return,
                }
            }
            tracing::warn!("the change subscription ended; subscribing again");
            self.mark_lost();
        }
    }
}

/// A subscription to one key's changes; unsubscribes when dropped.
pub struct Subscription {
    pub changes: broadcast::Receiver<Arc<Delivered>>,
    hub: Arc<ChangeHub>,
    key: TopicKey,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut channels = self
            .hub
            .channels
            .lock()
            .expect("the hub's lock is never poisoned");
        // Ours is the last receiver (subscribing takes the same lock).
        if channels
            .get(&self.key)
            .is_some_and(|channel| channel.unheard(1))
        {
            channels.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(seq: u64, prev: Option<u64>) -> Change {
        Change {
            topic: "leaderboard".into(),
            key: "t".into(),
            seq,
            data: serde_json::Value::Null,
            prev,
        }
    }

    #[tokio::test]
    async fn a_change_whose_predecessor_never_arrived_is_marked_as_a_gap() {
        let hub = ChangeHub::new(16, Duration::from_secs(60));
        let mut subscription = hub.subscribe("leaderboard", "t");
        // The first change of a fresh channel cannot tell; then each names
        // the one before it, until one names a change that did not arrive.
        for (seq, prev) in [
            (5, Some(3)),
            (9, Some(5)),
            (14, Some(12)),
            (20, None),
            (21, Some(20)),
        ] {
            hub.deliver(change(seq, prev));
        }
        let mut gaps = Vec::new();
        for _ in 0..5 {
            let delivered = subscription.changes.recv().await.unwrap();
            gaps.push((delivered.change.seq, delivered.gap));
        }
        assert_eq!(
            gaps,
            [(5, false), (9, false), (14, true), (20, false), (21, false)]
        );
    }
}
