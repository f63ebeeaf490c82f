//! Metadata recorded with every event: who acted, in which request, and when.

use std::collections::HashMap;

use crate::time::{Fraction, Rfc3339};
use chrono::{DateTime, Utc};

/// The acting user id used for events the system itself causes.
pub const SYSTEM_ACTOR: &str = "system";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMetadata {
    /// The user whose request caused the event, or [`SYSTEM_ACTOR`].
    pub actor: String,
    /// The request id (`x-request-id`) that carried the command.
    pub request_id: String,
    pub recorded_at: DateTime<Utc>,
}

impl EventMetadata {
    const ACTOR: &'static str = "actor";
    const REQUEST_ID: &'static str = "request_id";
    const RECORDED_AT: &'static str = "recorded_at";

    /// The map cqrs-es stores in the `metadata` column.
    pub fn into_map(self) -> HashMap<String, String> {
        HashMap::from([
            (Self::ACTOR.to_string(), self.actor),
            (Self::REQUEST_ID.to_string(), self.request_id),
            (
                Self::RECORDED_AT.to_string(),
                Rfc3339::new(&self.recorded_at, Fraction::Micros).to_string(),
            ),
        ])
    }

    /// Reads the map back; `None` when a key is missing or malformed.
    pub fn from_map(map: &HashMap<String, String>) -> Option<Self> {
        Some(Self {
            actor: map.get(Self::ACTOR)?.clone(),
            request_id: map.get(Self::REQUEST_ID)?.clone(),
            recorded_at: DateTime::parse_from_rfc3339(map.get(Self::RECORDED_AT)?)
                .ok()?
                .with_timezone(&Utc),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_stored_map() {
        let metadata = EventMetadata {
            actor: "alice".into(),
            request_id: "req-1".into(),
            recorded_at: DateTime::parse_from_rfc3339("2026-01-02T03:04:05.123456Z")
                .unwrap()
                .with_timezone(&Utc),
        };
        assert_eq!(
            EventMetadata::from_map(&metadata.clone().into_map()),
            Some(metadata)
        );
    }
}
