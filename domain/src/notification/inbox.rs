//! The `Inbox` aggregate, one per user (its id is the user id): it records
//! "mark all read", which the feed projection applies to every notification
//! that user received before it in the log.

use std::convert::Infallible;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::UserId;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Inbox {
    pub last_read_all_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub enum InboxCommand {
    ReadAll { user_id: UserId, now: DateTime<Utc> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InboxEvent {
    AllNotificationsRead {
        user_id: UserId,
        read_at: DateTime<Utc>,
    },
}

impl DomainEvent for InboxEvent {
    fn event_type(&self) -> String {
        match self {
            Self::AllNotificationsRead { .. } => "AllNotificationsRead".to_string(),
        }
    }

    fn event_version(&self) -> String {
        crate::EVENT_VERSION.to_string()
    }
}

impl Aggregate for Inbox {
    const TYPE: &'static str = "Inbox";
    type Command = InboxCommand;
    type Event = InboxEvent;
    type Error = Infallible;
    type Services = ();

    async fn handle(
        &mut self,
        command: InboxCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), Infallible> {
        let InboxCommand::ReadAll { user_id, now } = command;
        sink.write(
            InboxEvent::AllNotificationsRead {
                user_id,
                read_at: now,
            },
            self,
        )
        .await;
        Ok(())
    }

    fn apply(&mut self, event: InboxEvent) {
        let InboxEvent::AllNotificationsRead { read_at, .. } = event;
        self.last_read_all_at = Some(read_at);
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    #[test]
    fn read_all_is_recorded_every_time_it_is_asked() {
        let now = DateTime::parse_from_rfc3339("2026-03-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let user_id = UserId::parse("bob").unwrap();
        let event = InboxEvent::AllNotificationsRead {
            user_id: user_id.clone(),
            read_at: now,
        };
        TestFramework::<Inbox>::with(())
            .given(vec![event.clone()])
            .when(InboxCommand::ReadAll { user_id, now })
            .then_expect_events(vec![event]);
    }
}
