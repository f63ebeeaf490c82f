use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::NotificationContent;
use crate::UserId;

#[derive(Debug, Clone)]
pub enum NotificationCommand {
    /// Create a notification. Repeating it with the same content changes
    /// nothing, so a policy redelivering its trigger sends nothing twice.
    CreateNotification {
        notification_id: Uuid,
        content: NotificationContent,
        now: DateTime<Utc>,
    },
    /// Mark it read; marking a read notification again changes nothing.
    MarkRead { by: UserId, now: DateTime<Utc> },
}
