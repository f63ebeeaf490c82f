//! Notifications: the `Notification` aggregate (one message to one user, which
//! they can mark read) and the `Inbox` aggregate (one per user, which records
//! "mark everything read").

mod aggregate;
mod commands;
mod events;
mod inbox;

pub use aggregate::{
    Notification, NotificationContent, NotificationError, NotificationKind, NotificationMessage,
};
pub use commands::NotificationCommand;
pub use events::NotificationEvent;
pub use inbox::{Inbox, InboxCommand, InboxEvent};
