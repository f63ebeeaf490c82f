use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{NotificationCommand, NotificationEvent};
use crate::validation::ValidationErrors;
use crate::UserId;

pub const MAX_TITLE_LEN: usize = 200;
pub const MAX_BODY_LEN: usize = 5_000;
pub const MAX_LINK_LEN: usize = 2_048;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotificationKind {
    AttemptGraded,
    PersonalBest,
    RankOvertaken,
    /// One of the top three of a test's board when its day, week or month
    /// closed.
    PeriodPodium,
    Announcement,
}

impl NotificationKind {
    pub const ALL: [Self; 5] = [
        Self::AttemptGraded,
        Self::PersonalBest,
        Self::RankOvertaken,
        Self::PeriodPodium,
        Self::Announcement,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::AttemptGraded => "attempt_graded",
            Self::PersonalBest => "personal_best",
            Self::RankOvertaken => "rank_overtaken",
            Self::PeriodPodium => "period_podium",
            Self::Announcement => "announcement",
        }
    }
}

impl fmt::Display for NotificationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NotificationKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|k| k.as_str()).collect();
                format!("must be one of {}", names.join(", "))
            })
    }
}

/// What a notification says; checked on construction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationMessage {
    pub kind: NotificationKind,
    pub title: String,
    pub body: String,
    pub link: Option<String>,
}

impl NotificationMessage {
    /// Checks the sizes of title, body and link (the title is trimmed).
    pub fn new(
        kind: NotificationKind,
        title: String,
        body: String,
        link: Option<String>,
    ) -> Result<Self, ValidationErrors> {
        let mut errors = ValidationErrors::new();
        errors.check_len("title", title.trim(), 1, MAX_TITLE_LEN);
        errors.check_len("body", &body, 1, MAX_BODY_LEN);
        if let Some(link) = &link {
            errors.check_len("link", link, 1, MAX_LINK_LEN);
            if link.chars().any(char::is_whitespace) {
                errors.add("link", "must not contain whitespace");
            }
        }
        errors.into_result(Self {
            kind,
            title: title.trim().to_string(),
            body,
            link,
        })
    }
}

/// A message and its one recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationContent {
    pub recipient: UserId,
    #[serde(flatten)]
    pub message: NotificationMessage,
}

/// A notification as its events left it.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Notification {
    pub id: Option<Uuid>,
    pub content: Option<NotificationContent>,
    pub created_at: Option<DateTime<Utc>>,
    pub read_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotificationError {
    #[error("a different notification with this id already exists")]
    AlreadyExists,
    #[error("no such notification")]
    NotFound,
    #[error("this notification belongs to another user")]
    NotRecipient,
}

impl Aggregate for Notification {
    const TYPE: &'static str = "Notification";
    type Command = NotificationCommand;
    type Event = NotificationEvent;
    type Error = NotificationError;
    type Services = ();

    async fn handle(
        &mut self,
        command: NotificationCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), NotificationError> {
        match command {
            NotificationCommand::CreateNotification {
                notification_id,
                content,
                now,
            } => match &self.content {
                Some(existing) if *existing == content => Ok(()),
                Some(_) => Err(NotificationError::AlreadyExists),
                None => {
                    let event = NotificationEvent::NotificationCreated {
                        notification_id,
                        content,
                        created_at: now,
                    };
                    sink.write(event, self).await;
                    Ok(())
                }
            },
            NotificationCommand::MarkRead { by, now } => {
                let (Some(id), Some(content)) = (self.id, &self.content) else {
                    return Err(NotificationError::NotFound);
                };
                if content.recipient != by {
                    return Err(NotificationError::NotRecipient);
                }
                if self.read_at.is_none() {
                    let event = NotificationEvent::NotificationRead {
                        notification_id: id,
                        recipient: by,
                        read_at: now,
                    };
                    sink.write(event, self).await;
                }
                Ok(())
            }
        }
    }

    fn apply(&mut self, event: NotificationEvent) {
        match event {
            NotificationEvent::NotificationCreated {
                notification_id,
                content,
                created_at,
            } => {
                self.id = Some(notification_id);
                self.content = Some(content);
                self.created_at = Some(created_at);
            }
            NotificationEvent::NotificationRead { read_at, .. } => self.read_at = Some(read_at),
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    const ID: Uuid = Uuid::from_u128(9);

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-03-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn user(id: &str) -> UserId {
        UserId::parse(id).unwrap()
    }

    fn content(title: &str) -> NotificationContent {
        let message = NotificationMessage::new(
            NotificationKind::Announcement,
            title.into(),
            "Exams start Monday".into(),
            Some("https://example.org/exams".into()),
        )
        .unwrap();
        NotificationContent {
            recipient: user("bob"),
            message,
        }
    }

    fn create(title: &str) -> NotificationCommand {
        NotificationCommand::CreateNotification {
            notification_id: ID,
            content: content(title),
            now: now(),
        }
    }

    fn created() -> NotificationEvent {
        NotificationEvent::NotificationCreated {
            notification_id: ID,
            content: content("Hello"),
            created_at: now(),
        }
    }

    fn read() -> NotificationEvent {
        NotificationEvent::NotificationRead {
            notification_id: ID,
            recipient: user("bob"),
            read_at: now(),
        }
    }

    fn framework() -> TestFramework<Notification> {
        TestFramework::with(())
    }

    #[test]
    fn creating_records_the_notification() {
        framework()
            .given_no_previous_events()
            .when(create("Hello"))
            .then_expect_events(vec![created()]);
    }

    #[test]
    fn creating_again_with_the_same_content_changes_nothing() {
        framework()
            .given(vec![created()])
            .when(create("Hello"))
            .then_expect_events(vec![]);
    }

    #[test]
    fn creating_different_content_under_a_used_id_is_a_conflict() {
        framework()
            .given(vec![created()])
            .when(create("Other"))
            .then_expect_error(NotificationError::AlreadyExists);
    }

    #[test]
    fn content_is_checked() {
        let errors = NotificationMessage::new(
            NotificationKind::Announcement,
            "  ".into(),
            String::new(),
            Some("not a link".into()),
        )
        .unwrap_err();
        let fields: Vec<_> = errors.fields().iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["title", "body", "link"]);
        assert_eq!(
            "rank_overtaken".parse(),
            Ok(NotificationKind::RankOvertaken)
        );
        assert!("spam".parse::<NotificationKind>().is_err());
    }

    #[test]
    fn the_recipient_marks_it_read_once() {
        let mark = |by: &str| NotificationCommand::MarkRead {
            by: user(by),
            now: now(),
        };
        framework()
            .given(vec![created()])
            .when(mark("bob"))
            .then_expect_events(vec![read()]);
        framework()
            .given(vec![created(), read()])
            .when(mark("bob"))
            .then_expect_events(vec![]);
        framework()
            .given(vec![created()])
            .when(mark("eve"))
            .then_expect_error(NotificationError::NotRecipient);
        framework()
            .given_no_previous_events()
            .when(mark("bob"))
            .then_expect_error(NotificationError::NotFound);
    }
}
