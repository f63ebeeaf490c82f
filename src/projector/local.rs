//! The in-process runner of the embedded mode: Podium in one process with no Postgres and no NATS.
//! The event log lives in memory (and optionally in a local file); one
//! projector task follows it in order, keeps every read model in memory and
//! runs the notification policy; changes go straight to the [`ChangeHub`]
//! that NATS feeds in production. Commands, the HTTP API, the cache and the
//! SSE streams are the same code as in production.

use std::sync::Arc;
use std::time::Duration;

use podium_projections::memory::MemoryModels;
use tokio_util::sync::CancellationToken;

use crate::command::policy::{MemoryBests, NotificationPolicy};
use crate::command::Aggregates;
use crate::delivery::{Channel, Deliveries};
use crate::log::memory::MemLog;
use crate::ops::metrics::{Metrics, Probe};
use crate::query::changes::ChangeHub;

/// The projector's name in metrics.
pub const PROJECTOR: &str = "embedded";

/// Events the projector takes from the log at a time.
const BATCH: usize = 500;
/// How long the projector waits before retrying a failed event.
const RETRY: Duration = Duration::from_millis(200);

/// The embedded mode's projector: the in-memory log it follows and the
/// read models it keeps.
pub struct LocalProjector {
    pub log: Arc<MemLog>,
    pub models: Arc<MemoryModels>,
}

impl LocalProjector {
    pub fn new(log: Arc<MemLog>) -> Self {
        let models = Arc::new(MemoryModels::new());
        let head = log.clone();
        models.follow_head(move || head.last());
        Self { log, models }
    }

    /// The read models' checkpoint and the log's last seq.
    pub fn progress(&self) -> (u64, u64) {
        (self.models.checkpoint(), *self.log.tail().borrow())
    }

    /// Follows the log until `stop`: applies each event to the read models,
    /// announces the changes, and runs the notification policy (whose
    /// commands append to the same log), and records the deliveries of
    /// events appended since it started. At start it replays the whole log,
    /// which is how a file-backed log rebuilds its read models (what it read
    /// back was delivered, or not, by the process that appended it).
    pub async fn project(
        self: Arc<Self>,
        aggregates: Arc<Aggregates>,
        hub: Arc<ChangeHub>,
        deliveries: Arc<Deliveries>,
        stop: CancellationToken,
    ) {
        let delivered_up_to = *self.log.tail().borrow();
        let policy = NotificationPolicy::new(aggregates);
        let mut bests = MemoryBests::default();
        // The policy's own checkpoint: it acts once per event, even on replay
        // of a file (its commands' ids are deterministic: repeats are no-ops).
        let mut policy_at = 0;
        let mut tail = self.log.tail();
        loop {
            let at = self.models.checkpoint().min(policy_at);
            let events = self.log.read_after(at, BATCH);
            if events.is_empty() {
                tokio::select! {
                    changed = tail.changed() => if changed.is_err() { return },
                    () = stop.cancelled() => return,
                }
                continue;
            }
            for event in &events {
                let applied = self.models.apply(event).map(|changes| {
                    for change in changes {
                        hub.deliver(change);
                    }
                });
                let decided = match applied {
                    Ok(()) if event.seq > policy_at => policy.handle(&mut bests, event).await,
                    Ok(()) => Ok(()),
                    Err(err) => Err(err),
                };
                let decided = match decided {
                    Ok(()) if event.seq > delivered_up_to && event.seq > policy_at => deliveries
                        .intake(&Channel::ALL, std::slice::from_ref(event))
                        .await
                        .map(drop)
                        .map_err(|err| err.to_string()),
                    other => other.map_err(|err| err.to_string()),
                };
                match decided {
                    Ok(()) => policy_at = policy_at.max(event.seq),
                    Err(err) => {
                        tracing::error!(seq = event.seq, %err, "cannot project an event; retrying");
                        if podium_nats::stopped_during(RETRY, &stop).await {
                            return;
                        }
                        break;
                    }
                }
            }
        }
    }
}

/// Its position and the log's head, for `/metrics`.
#[async_trait::async_trait]
impl Probe for LocalProjector {
    fn read(&self, metrics: &Metrics) {
        let (checkpoint, head) = self.progress();
        let p = [PROJECTOR];
        metrics
            .projection_checkpoint
            .with_label_values(&p)
            .set(checkpoint as i64);
        metrics
            .projection_lag_events
            .with_label_values(&p)
            .set(head.saturating_sub(checkpoint) as i64);
    }
}
