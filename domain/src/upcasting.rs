//! Upcasting: turning stored events of an older `event_version` into the shape
//! today's code reads.
//!
//! Every reader of the log — the aggregates' event store, the relay, replay —
//! takes its upcasters from [`upcasters`], so an event written years ago is read
//! the same way everywhere. All events are at version [`crate::EVENT_VERSION`]
//! today, so the list is empty; when an event changes shape, bump its version
//! and add a `cqrs_es::persist::SemanticVersionEventUpcaster` here.

use cqrs_es::persist::EventUpcaster;

/// The upcasters every reader of the event log applies, oldest first.
pub fn upcasters() -> Vec<Box<dyn EventUpcaster>> {
    Vec::new()
}
