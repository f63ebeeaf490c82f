use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::NotificationContent;
use crate::UserId;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NotificationEvent {
    NotificationCreated {
        notification_id: Uuid,
        #[serde(flatten)]
        content: NotificationContent,
        created_at: DateTime<Utc>,
    },
    NotificationRead {
        notification_id: Uuid,
        recipient: UserId,
        read_at: DateTime<Utc>,
    },
}

impl DomainEvent for NotificationEvent {
    fn event_type(&self) -> String {
        match self {
            Self::NotificationCreated { .. } => "NotificationCreated",
            Self::NotificationRead { .. } => "NotificationRead",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        crate::EVENT_VERSION.to_string()
    }
}
