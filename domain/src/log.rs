//! The event log as its readers see it: every stored event with its place in
//! the one total order (`seq`) that the relay publishes and replay reproduces.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use cqrs_es::persist::SerializedEvent;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::attempt::{Attempt, AttemptEvent};
use crate::collection::{Collection, CollectionEvent};
use crate::notification::{Inbox, InboxEvent, Notification, NotificationEvent};
use crate::test::{Test, TestEvent};

/// An event's payload as the log stores it: its JSON text, checked but not
/// parsed into a tree. It is parsed once, straight into the domain's type,
/// by whoever wants the event ([`RecordedEvent::decode`]); the relay and the
/// workers that pass an event over never parse it.
pub type Payload = Box<serde_json::value::RawValue>;

/// `value` as a [`Payload`].
pub fn payload_of(value: &impl Serialize) -> Payload {
    serde_json::value::to_raw_value(value).expect("a payload serializes into JSON")
}

/// The payload of an event whose payload was not read.
fn no_payload() -> Payload {
    serde_json::value::RawValue::from_string("null".to_string()).expect("null is JSON")
}

/// One event of the log, with its global order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// 1-based place in the log's total (commit-safe) order: contiguous, so a
    /// reader that has applied `n` knows the next one is `n + 1`.
    pub seq: u64,
    /// The row's identity column: unique, but in insertion, not commit, order.
    pub position: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// The event's number within its aggregate, from 1.
    pub sequence: u64,
    pub event_type: String,
    pub event_version: String,
    pub payload: Payload,
    pub metadata: HashMap<String, String>,
    pub recorded_at: DateTime<Utc>,
}

impl RecordedEvent {
    /// Event `seq` as a reader that does not want it sees it: its place in
    /// the log and its type, nothing of its payload or metadata (a projection
    /// moves its checkpoint past it; decoding it would be wasted).
    pub fn passed_over(seq: u64, aggregate_type: &str, event_type: &str) -> Self {
        Self {
            seq,
            position: 0,
            aggregate_type: aggregate_type.to_string(),
            aggregate_id: String::new(),
            sequence: 0,
            event_type: event_type.to_string(),
            event_version: String::new(),
            payload: no_payload(),
            metadata: HashMap::new(),
            recorded_at: DateTime::UNIX_EPOCH,
        }
    }
}

/// What a projection changed in its read model, announced after it commits
/// so caches and live streams can refresh. `topic` names the read model
/// (`leaderboard`, `feed`…), `key` the part that changed (a test id, a user
/// id); `data` says what changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub topic: String,
    pub key: String,
    /// The log seq of the event that caused the change.
    pub seq: u64,
    pub data: serde_json::Value,
    /// The seq of the change its publisher announced before this one for
    /// the same topic and key, when it knows it: a subscriber whose last
    /// change of the key is older missed one in between.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<u64>,
}

/// A decoded event of any aggregate.
#[derive(Debug, Clone, PartialEq)]
pub enum PodiumEvent {
    Test(TestEvent),
    Attempt(AttemptEvent),
    Notification(NotificationEvent),
    Inbox(InboxEvent),
    Collection(CollectionEvent),
}

/// Why a recorded event cannot be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown aggregate type {0:?}")]
    UnknownAggregate(String),
    #[error("cannot decode {event_type} v{version}: {source}")]
    Payload {
        event_type: String,
        version: String,
        source: serde_json::Error,
    },
}

/// Equal events hold the same JSON text (two texts of the same value that
/// differ in spacing or key order are not equal).
impl PartialEq for RecordedEvent {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq
            && self.position == other.position
            && self.aggregate_type == other.aggregate_type
            && self.aggregate_id == other.aggregate_id
            && self.sequence == other.sequence
            && self.event_type == other.event_type
            && self.event_version == other.event_version
            && self.payload.get() == other.payload.get()
            && self.metadata == other.metadata
            && self.recorded_at == other.recorded_at
    }
}

impl RecordedEvent {
    /// The payload parsed into a JSON tree (for upcasters and tests; the
    /// domain's types are decoded straight from the text).
    pub fn payload_value(&self) -> serde_json::Value {
        serde_json::from_str(self.payload.get()).unwrap_or_default()
    }

    /// A stable identity for de-duplication: aggregate type, id and sequence.
    pub fn identity(&self) -> String {
        format!(
            "{}:{}:{}",
            self.aggregate_type, self.aggregate_id, self.sequence
        )
    }

    /// The event as cqrs-es stores it (with its metadata).
    pub fn serialized(&self) -> SerializedEvent {
        SerializedEvent::new(
            self.aggregate_id.clone(),
            self.sequence as usize,
            self.aggregate_type.clone(),
            self.event_type.clone(),
            self.event_version.clone(),
            self.payload_value(),
            serde_json::to_value(&self.metadata).unwrap_or_default(),
        )
    }

    /// The event after every upcaster of [`crate::upcasting`] has run. An
    /// event no upcaster touches (every current one) is read straight from
    /// its payload, without copying it.
    pub fn decode(&self) -> Result<PodiumEvent, DecodeError> {
        let upcasters = crate::upcasting::upcasters();
        if !upcasters
            .iter()
            .any(|u| u.can_upcast(&self.event_type, &self.event_version))
        {
            return self.decode_payload(self.payload.get());
        }
        let mut serialized = self.serialized();
        for upcaster in upcasters {
            if upcaster.can_upcast(&serialized.event_type, &serialized.event_version) {
                serialized = upcaster.upcast(serialized);
            }
        }
        self.decode_payload(&serialized.payload.to_string())
    }

    fn decode_payload(&self, payload: &str) -> Result<PodiumEvent, DecodeError> {
        use serde_json::from_str as parse;
        let fail = |source| DecodeError::Payload {
            event_type: self.event_type.clone(),
            version: self.event_version.clone(),
            source,
        };
        Ok(match self.aggregate_type.as_str() {
            Test::TYPE => PodiumEvent::Test(parse(payload).map_err(fail)?),
            Attempt::TYPE => PodiumEvent::Attempt(parse(payload).map_err(fail)?),
            Notification::TYPE => PodiumEvent::Notification(parse(payload).map_err(fail)?),
            Inbox::TYPE => PodiumEvent::Inbox(parse(payload).map_err(fail)?),
            Collection::TYPE => PodiumEvent::Collection(parse(payload).map_err(fail)?),
            other => return Err(DecodeError::UnknownAggregate(other.to_string())),
        })
    }
}

impl PodiumEvent {
    pub fn event_type(&self) -> String {
        match self {
            Self::Test(e) => e.event_type(),
            Self::Attempt(e) => e.event_type(),
            Self::Notification(e) => e.event_type(),
            Self::Inbox(e) => e.event_type(),
            Self::Collection(e) => e.event_type(),
        }
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    fn recorded(aggregate_type: &str, payload: serde_json::Value) -> RecordedEvent {
        RecordedEvent {
            seq: 1,
            position: 1,
            aggregate_type: aggregate_type.into(),
            aggregate_id: "x".into(),
            sequence: 1,
            event_type: "TestArchived".into(),
            event_version: "1.0".into(),
            payload: payload_of(&payload),
            metadata: HashMap::new(),
            recorded_at: Utc::now(),
        }
    }

    #[test]
    fn decodes_a_stored_payload_into_its_aggregate_event() {
        let test_id = Uuid::from_u128(5);
        let payload = serde_json::to_value(TestEvent::TestArchived { test_id }).unwrap();
        let event = recorded("Test", payload).decode().unwrap();
        assert_eq!(
            event,
            PodiumEvent::Test(TestEvent::TestArchived { test_id })
        );
        assert_eq!(event.event_type(), "TestArchived");
    }

    #[test]
    fn reports_unknown_aggregates_and_bad_payloads() {
        let unknown = recorded("Invoice", serde_json::json!({}));
        assert!(matches!(
            unknown.decode(),
            Err(DecodeError::UnknownAggregate(_))
        ));
        let bad = recorded("Test", serde_json::json!({"Nope": {}}));
        assert!(matches!(bad.decode(), Err(DecodeError::Payload { .. })));
    }
}
