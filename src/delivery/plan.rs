//! What an event asks to send: the webhook events of the contract, and the
//! email a notification becomes for a recipient who chose its kind. Pure:
//! the settings and endpoints it needs are handed in.

use std::collections::HashMap;

use podium_domain::attempt::AttemptEvent;
use podium_domain::log::{PodiumEvent, RecordedEvent};
use podium_domain::notification::{NotificationEvent, NotificationKind};
use podium_domain::test::TestEvent;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{Channel, EmailSettings, Endpoint};

/// The webhook event types, as endpoints subscribe to them.
pub const WEBHOOK_EVENTS: [&str; 3] = [
    "attempt.submitted",
    "notification.created",
    "test.published",
];

/// The aggregate and event type of the notifications that become emails.
pub const EMAILED: (&str, &str) = ("Notification", "NotificationCreated");

/// Whether events of this type can become emails.
pub fn emailed(aggregate_type: &str, event_type: &str) -> bool {
    (aggregate_type, event_type) == EMAILED
}

/// The webhook event type that events of this aggregate and event type
/// become, if any: what intake reads off a message's subject to pass the
/// others over undecoded. The same as [`webhook_event`] says of the
/// decoded event (a test holds them to it).
pub fn webhook_kind(aggregate_type: &str, event_type: &str) -> Option<&'static str> {
    match (aggregate_type, event_type) {
        ("Attempt", "AttemptSubmitted") => Some("attempt.submitted"),
        EMAILED => Some("notification.created"),
        ("Test", "TestPublished") => Some("test.published"),
        _ => None,
    }
}

/// Sent first: everything but announcements.
pub const PERSONAL: i16 = 0;
/// Sent when nothing personal waits: announcements, which go to many at once.
pub const BULK: i16 = 1;

/// Names delivery ids: the same channel, event and target always give the
/// same id, so recording a delivery twice records it once.
const NAMESPACE: Uuid = Uuid::from_u128(0x6a0e_2f4c_94d1_4c59_8f0b_5d1c_7e3a_0b21);

/// One message to send, before it is recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub id: Uuid,
    /// The log seq of the event: deliveries are recorded in log order.
    pub seq: u64,
    pub channel: Channel,
    /// The address, or the endpoint's id.
    pub target: String,
    pub endpoint_id: Option<Uuid>,
    /// The webhook event type, or the notification's kind.
    pub event: String,
    /// The same for every target of one event.
    pub message_id: String,
    pub priority: i16,
    /// What is sent: the webhook body, or the email's parts.
    pub payload: Value,
}

/// A notification as email needs it.
pub struct Notice<'a> {
    pub recipient: &'a str,
    pub kind: NotificationKind,
}

/// The recipient and kind of `event`, if it created a notification.
pub fn notice(event: &PodiumEvent) -> Option<Notice<'_>> {
    match event {
        PodiumEvent::Notification(NotificationEvent::NotificationCreated { content, .. }) => {
            Some(Notice {
                recipient: content.recipient.as_str(),
                kind: content.message.kind,
            })
        }
        _ => None,
    }
}

/// The webhook message id of an event: `msg_` and a UUID derived from its
/// place in its aggregate, the same on every retry and every endpoint.
fn message_id(event: &RecordedEvent) -> String {
    format!(
        "msg_{}",
        Uuid::new_v5(&NAMESPACE, event.identity().as_bytes()).simple()
    )
}

fn delivery_id(channel: Channel, event: &RecordedEvent, target: &str) -> Uuid {
    let name = format!("{}\n{}\n{target}", channel.as_str(), event.identity());
    Uuid::new_v5(&NAMESPACE, name.as_bytes())
}

fn priority_of(kind: NotificationKind) -> i16 {
    if kind == NotificationKind::Announcement {
        BULK
    } else {
        PERSONAL
    }
}

/// The email `event` becomes, if it created a notification of a kind its
/// recipient chose and the recipient has an address.
pub fn email(
    recorded: &RecordedEvent,
    event: &PodiumEvent,
    settings: &HashMap<String, EmailSettings>,
) -> Option<Planned> {
    let PodiumEvent::Notification(NotificationEvent::NotificationCreated {
        notification_id,
        content,
        created_at,
    }) = event
    else {
        return None;
    };
    let kind = content.message.kind;
    let chosen = settings.get(content.recipient.as_str())?;
    let address = chosen.email.as_ref()?;
    if !chosen.email_kinds.iter().any(|k| k == kind.as_str()) {
        return None;
    }
    Some(Planned {
        id: delivery_id(Channel::Email, recorded, address),
        seq: recorded.seq,
        channel: Channel::Email,
        target: address.clone(),
        endpoint_id: None,
        event: kind.as_str().to_string(),
        message_id: message_id(recorded),
        priority: priority_of(kind),
        payload: json!({
            "notification_id": notification_id,
            "recipient": content.recipient,
            "kind": kind,
            "title": content.message.title,
            "body": content.message.body,
            "link": content.message.link,
            "created_at": created_at,
        }),
    })
}

/// The webhook event type, data and priority of `event`, if it is one of
/// the contract's.
fn webhook_event(event: &PodiumEvent) -> Option<(&'static str, Value, i16)> {
    match event {
        PodiumEvent::Attempt(AttemptEvent::AttemptSubmitted {
            attempt_id,
            test_id,
            user_id,
            score,
            max_score,
            correct,
            duration_ms,
            submitted_at,
            ..
        }) => Some((
            "attempt.submitted",
            json!({
                "attempt_id": attempt_id,
                "test_id": test_id,
                "score": score,
                "max_score": max_score,
                "correct": correct,
                "duration_ms": duration_ms,
                "submitted_at": submitted_at,
                "user_id": user_id,
            }),
            PERSONAL,
        )),
        PodiumEvent::Notification(NotificationEvent::NotificationCreated {
            notification_id,
            content,
            created_at,
        }) => Some((
            "notification.created",
            json!({
                "id": notification_id,
                "kind": content.message.kind,
                "title": content.message.title,
                "body": content.message.body,
                "link": content.message.link,
                "created_at": created_at,
                "read_at": null,
                "recipient": content.recipient,
            }),
            priority_of(content.message.kind),
        )),
        PodiumEvent::Test(TestEvent::TestPublished {
            test_id,
            definition,
        }) => Some((
            "test.published",
            json!({
                "id": test_id,
                "title": definition.title,
                "max_score": definition.max_score(),
            }),
            PERSONAL,
        )),
        _ => None,
    }
}

/// One delivery of `event` per active endpoint that subscribes to its type.
pub fn webhooks(
    recorded: &RecordedEvent,
    event: &PodiumEvent,
    endpoints: &[Endpoint],
) -> Vec<Planned> {
    let Some((kind, data, priority)) = webhook_event(event) else {
        return Vec::new();
    };
    let body = json!({
        "type": kind,
        "timestamp": recorded.recorded_at,
        "data": data,
    });
    endpoints
        .iter()
        .filter(|e| e.active() && e.wants(kind))
        .map(|endpoint| {
            let target = endpoint.id.to_string();
            Planned {
                id: delivery_id(Channel::Webhook, recorded, &target),
                seq: recorded.seq,
                channel: Channel::Webhook,
                target,
                endpoint_id: Some(endpoint.id),
                event: kind.to_string(),
                message_id: message_id(recorded),
                priority,
                payload: body.clone(),
            }
        })
        .collect()
}
